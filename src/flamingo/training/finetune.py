"""Fine-tuning a trained Flamingo on one benchmark's training split (paper section 3.2, B.2.2).

The paper fine-tunes on "data batches from the task of interest in the same format as the
single-image/video datasets", keeps the LM blocks frozen, trains the Flamingo layers, and also
unfreezes the vision encoder at a higher input resolution, on a short schedule with a small
learning rate. Here a fine-tuning run is a training run (`flamingo.training.trainer`: the same
optimiser, per-group learning rates, schedules, checkpoints and exact resume) whose data is a
benchmark's `train` split read by the benchmarks' loaders (`flamingo.data.benchmarks`, the
data config of `flamingo eval`), each sample written exactly as a demo of the few-shot prompt:

    [BOS] <image>Question: {question} Answer: {answer}<|endofchunk|>

with the loss on " {answer}<|endofchunk|>" only: the tokens the evaluation's generation (or
close-ended ranking) produces after the query. So `flamingo eval` measures the fine-tuned model
as it measures any other. The config (YAML; `load_finetune_config`):

    base: runs/pretrain/final          # the zero-shot model: a saved model directory, a hub id or "embedded"
    task: vqav2                        # a benchmark of `flamingo eval`
    data: data.yaml                    # its data config (relative to this file); the task's train split is used
    image_size: 448                    # null: the base model's resolution
    unfreeze: {vision: true, lm_blocks: []}
    batch_size: 8
    max_tokens: 512                    # longer samples are skipped and counted
    video_frames: 8                    # video tasks: frames per clip at video_fps (paper: 8 at 1 FPS)
    video_fps: 1.0
    wise_alpha: [0.5]                  # WiSE-FT models written after training (flamingo.training.wise_ft)
    lora: {rank: 8, targets: [q_proj, v_proj]}  # LoRA adapters too (flamingo.model.lora); null: none
    train:                             # any training-config field but model, datasets, init_from, lora
      steps: 1000
      optim: {lr: 1.0e-5, lr_scale: {vision_encoder: 0.1}}
      schedule: {kind: cosine, warmup_steps: 50}

The run starts from the base model's weights; unfrozen backbone parts start from their
pretrained values. RUN_DIR/final is a normal model directory (config.yaml with the `unfreeze`
section, safetensors holding the bridge and the unfrozen parts, provenance.json naming the base
and the hash of its weights, which `wise-ft` checks).

The training data is also a dataset kind of its own, usable in any training config:
`{name: vqa, kind: task, task: vqav2, data: data.yaml, batch_size: 8}`
(`flamingo.training.task_source.TaskSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo.config_io import field_checker, fields_from_dict
from flamingo.data.benchmarks.tasks import get_task
from flamingo.model.config import ConfigError, FlamingoConfig, UnfreezeConfig
from flamingo.model.families import FAMILIES, converted_family, family_of
from flamingo.model.vision import MAX_IMAGE_SIZE
from flamingo.training.config import TrainConfig, apply_override, read_yaml_mapping



# ------------------------------------------------------------------------------ the config
@dataclass
class FinetuneConfig:
    """A fine-tuning run; see the module docstring. `train` holds training-config fields."""

    base: str
    task: str
    data: str
    image_size: int | None = None
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    batch_size: int = 8
    max_tokens: int = 512
    video_frames: int = 8
    video_fps: float = 1.0
    wise_alpha: list[float] = field(default_factory=list)
    lora: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check = field_checker("fine-tuning config", ConfigError)

        get_task(self.task)
        check(self.image_size is None or 1 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
              f"null or an integer in [1, {MAX_IMAGE_SIZE}]", self.image_size)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(all(0 <= a <= 1 and math.isfinite(a) for a in self.wise_alpha), "wise_alpha",
              "a list of numbers in [0, 1]", self.wise_alpha)
        owned = sorted({"model", "datasets", "init_from", "lora"} & set(self.train))
        check(not owned, "train", "training-config fields other than model, datasets, init_from and lora (the "
              "fine-tuning config sets those from base, task, data and lora)", owned)

    def dataset(self) -> dict[str, Any]:
        """The `kind: task` dataset entry of the training config."""
        return {"name": self.task, "kind": "task", "batch_size": self.batch_size, "task": self.task,
                "data": self.data, "max_tokens": self.max_tokens,
                "video_frames": self.video_frames, "video_fps": self.video_fps}

    def model_config(self, base_dir: Path) -> FlamingoConfig:
        """The base model's architecture, with this run's unfrozen parts and resolution."""
        from flamingo.model.weights import directory_config

        config = directory_config(base_dir)
        config.unfreeze = UnfreezeConfig(self.unfreeze.vision, list(self.unfreeze.lm_blocks))
        family = converted_family(base_dir)
        if self.image_size is not None and family is not None:
            raise ConfigError(f"image_size: {self.image_size}, but the base is a {FAMILIES.get(family, family)} "
                              f"model, whose images are sized by its own image processor: leave image_size null")
        if self.image_size is not None:
            config.vision.image_size = self.image_size
        config.validate()
        return config

    def train_config(self, base_dir: Path, source: str = "fine-tuning config") -> TrainConfig:
        model = self.model_config(base_dir)
        config = TrainConfig.from_dict({**self.train, "model": model.to_dict(), "datasets": [self.dataset()],
                                        "init_from": str(base_dir), "lora": self.lora}, source=source)
        stored_low = model.lm.dtype != "float32" or config.frozen_dtype == "bfloat16"
        if model.unfreeze.lm_blocks and stored_low and config.precision != "bf16":
            # An fp32 block between reduced-precision frozen blocks hands them fp32 activations.
            raise ConfigError(f"{source}: unfreeze.lm_blocks: the frozen LM is stored in reduced precision "
                              f"(lm.dtype {model.lm.dtype}, frozen_dtype {config.frozen_dtype}); train its "
                              f"unfrozen blocks with train.precision: bf16 (autocast), or store the LM in float32")
        return config


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a fine-tuning YAML and apply dotted `key=value` overrides (e.g. train.steps=10,
    unfreeze.vision=false). The file's `data` is relative to the file (an override's to the working
    directory); train.run_dir defaults to runs/<file stem>."""
    path = Path(path)
    data = read_yaml_mapping(path, "fine-tuning config")
    if isinstance(data.get("data"), str) and not Path(data["data"]).is_absolute():
        data["data"] = str(path.parent / data["data"])  # before the overrides: theirs are as typed
    for item in overrides:
        apply_override(data, item)
    missing = [k for k in ("base", "task", "data") if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing required field(s) {missing}")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: train: expected a mapping of training-config fields, got {train!r}")
    data["train"] = {**train, "run_dir": train.get("run_dir") or str(Path("runs") / path.stem)}
    return FinetuneConfig(**fields_from_dict(FinetuneConfig, data, str(path), error=ConfigError))


def finetune(config: FinetuneConfig, *, resume: str | Path | None = None,
             trust_remote_code: bool = False) -> tuple[Any, list[Path]]:
    """Fine-tune as `config` says (or resume); returns the `TrainResult` and the WiSE-FT model
    directories written after training (RUN_DIR/wise-ft-<alpha>, one per `wise_alpha`, replaced
    when the run is resumed). `trust_remote_code`: see `flamingo.model.weights.build_flamingo`."""
    from flamingo.model.weights import CONFIG_FILE, model_directory
    from flamingo.training.trainer import train
    from flamingo.training.wise_ft import wise_ft

    base = Path(config.base)
    if base.is_dir() and not (base / CONFIG_FILE).is_file() and family_of(base):
        raise ConfigError(f"base: {config.base} is a {FAMILIES.get(family_of(base))} checkpoint as transformers saves "
                          f"it; fine-tuning starts from our model directory of it, written once: flamingo convert "
                          f"{config.base} OUT, then base: OUT")
    base_dir = model_directory(config.base)
    result = train(config.train_config(base_dir), resume=resume, trust_remote_code=trust_remote_code,
                   base_spec=config.base)
    wise_dirs = []
    if result.final_dir is not None:
        for alpha in config.wise_alpha:
            wise_dirs.append(wise_ft(base_dir, result.final_dir, alpha, result.run_dir / f"wise-ft-{alpha:g}",
                                     overwrite=True, trust_remote_code=trust_remote_code, zero_shot_spec=config.base))
    return result, wise_dirs
