"""Fine-tuning a trained Flamingo on one benchmark's training split (paper section 3.2, B.2.2).

The paper fine-tunes on "data batches from the task of interest in the same format as the
single-image/video datasets", keeps the LM blocks frozen, trains the Flamingo layers, and also
unfreezes the vision encoder at a higher input resolution, on a short schedule with a small
learning rate. Here a fine-tuning run is a training run (`flamingo.training.trainer`: the same
optimiser, per-group learning rates, schedules, checkpoints and exact resume) whose data is a
benchmark's `train` split read by the evaluation loaders (`flamingo.evaluation.loaders`, the
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
    train:                             # any training-config field but model, datasets, init_from
      steps: 1000
      optim: {lr: 1.0e-5, lr_scale: {vision_encoder: 0.1}}
      schedule: {kind: cosine, warmup_steps: 50}

The run starts from the base model's weights; unfrozen backbone parts start from their
pretrained values. RUN_DIR/final is a normal model directory (config.yaml with the `unfreeze`
section, safetensors holding the bridge and the unfrozen parts, provenance.json naming the base
and the hash of its weights, which `wise-ft` checks).

The training data is also a dataset kind of its own, usable in any training config:
`{name: vqa, kind: task, task: vqav2, data: data.yaml, batch_size: 8}` (`TaskSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flamingo.config_io import field_checker, fields_from_dict
from flamingo.data.batch import IGNORE_INDEX, TrainingSample
from flamingo.data.loader import DataStats
from flamingo.data.media import SkipSample
from flamingo.data.processing import Outcome
from flamingo.evaluation.data_config import load_data_config
from flamingo.evaluation.loaders import LOADERS
from flamingo.evaluation.media import VideoSampling, read_media
from flamingo.evaluation.tasks import get_task
from flamingo.model.config import ConfigError, FlamingoConfig, UnfreezeConfig
from flamingo.training.config import TrainConfig, apply_override, read_yaml_mapping
from flamingo.training.synthetic import InMemorySource

TASK_OPTIONS = ("task", "data", "max_tokens", "video_frames", "video_fps")
# Samples tried in place of one that cannot be used (unreadable media, too long) before giving up.
MAX_REPLACEMENTS = 64


class TaskSource(InMemorySource):
    """Training batches of a benchmark's train split, in the evaluation's prompt format (module docstring).

    Sample `index` is sample `permutation_e[index mod n]` of epoch e = index // n, the
    permutation seeded by (seed, dataset name, e): a pure function of the index, so batches are
    sharded over ranks and resumed exactly as the other in-memory sources. A sample whose media
    cannot be read, or longer than `max_tokens`, is replaced by the next one of the stream and
    counted in `stats` (by reason).
    """

    def __init__(self, name: str, tokenizer: Any, media_token_id: int, eoc_token_id: int, image_processor: Any,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, *, task: str,
                 data: str, max_tokens: int = 512, video_frames: int = 8,
                 video_fps: float = 1.0) -> None:
        super().__init__(name, tokenizer, batch_size, seed, rank, world_size)
        where = f"dataset {name!r}"
        self.task = get_task(task)
        if self.task.zero_shot_only or self.task.kind == "retrieval":
            raise ConfigError(f"{where}: task {task!r} is evaluated zero-shot only; it has no training format")
        if not (isinstance(max_tokens, int) and max_tokens >= 4):
            raise ConfigError(f"{where}: max_tokens: expected an integer >= 4, got {max_tokens!r}")
        if not (isinstance(video_frames, int) and video_frames >= 1 and video_fps > 0):
            raise ConfigError(f"{where}: video_frames / video_fps: expected an integer >= 1 and a number > 0, "
                              f"got {video_frames!r} / {video_fps!r}")
        paths = load_data_config(data).task(task).train
        if paths is None:
            raise ConfigError(f"{data}: tasks.{task} has no train split to fine-tune on")
        self.samples = LOADERS[self.task.loader](paths, "train", f"tasks.{task}.train")
        if not self.samples:
            raise ConfigError(f"{data}: tasks.{task}.train holds no samples")
        self.tokenizer, self.processor = tokenizer, image_processor
        self.media_token_id, self.eoc_token_id = media_token_id, eoc_token_id
        self.max_tokens = max_tokens
        self.sampling = VideoSampling(video_frames, float(video_fps))
        # What the tokenizer puts in front of a prompt (a BOS or nothing), as at inference.
        self.prefix = tokenizer("", add_special_tokens=True)["input_ids"]
        self.stats = DataStats()
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def _text_ids(self, text: str) -> list[int]:
        special = (self.media_token_id, self.eoc_token_id)  # only this code places those tokens
        return [t for t in self.tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special]

    def _answer(self, sample: Any, rng: np.random.Generator) -> str:
        """Captions: one reference drawn at random (each is a correct target); other tasks: the
        answer a demo shows (the label, the most frequent VQA answer)."""
        if self.task.kind == "caption" and sample.answers:
            return sample.answers[int(rng.integers(len(sample.answers)))]
        return self.task.demo_answer(sample)

    def build(self, sample: Any, rng: np.random.Generator) -> TrainingSample:
        """One evaluation sample as a training sample; raises SkipSample."""
        query = self._text_ids(self.task.query_text(sample))
        answer = self._text_ids(" " + self._answer(sample, rng)) + [self.eoc_token_id]
        head = [*self.prefix, self.media_token_id, *query]
        if len(head) + len(answer) > self.max_tokens:
            raise SkipSample("too_long", f"sample {sample.id}: {len(head) + len(answer)} tokens > max_tokens "
                                         f"{self.max_tokens}")
        frames = read_media(sample, self.task.video, self.sampling)
        pixels = self.processor.preprocess_video(frames)[None]  # [N=1, T, 3, H, W]
        input_ids = torch.tensor(head + answer, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(head):] = input_ids[len(head):]
        return TrainingSample(input_ids, labels, pixels, attend_next=False, dataset=self.name)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)))
        return self._epoch_order[1]

    def sample(self, index: int) -> TrainingSample:
        n = len(self.samples)
        for offset in range(MAX_REPLACEMENTS):
            epoch, slot = divmod(index + offset, n)
            order = self._order(epoch)
            rng = np.random.default_rng([self.seed, epoch, slot])
            try:
                out = self.build(self.samples[int(order[slot])], rng)
            except SkipSample as err:
                self.stats.add(Outcome(reason=err.reason, message=err.message))
                continue
            self.stats.add(Outcome(sample=out))
            return out
        raise ConfigError(f"dataset {self.name!r}: {MAX_REPLACEMENTS} samples in a row could not be used "
                          f"({self.stats.summary()}; last: {'; '.join(self.stats.messages.values())[:300]})")


def task_source(spec: Any, model: Any, image_processor: Any, seed: int, rank: int, world_size: int) -> TaskSource:
    """The `kind: task` dataset of a training config (see `flamingo.training.data`)."""
    unknown = sorted(set(spec.options) - set(TASK_OPTIONS))
    missing = [k for k in ("task", "data") if k not in spec.options]
    if unknown or missing:
        raise ConfigError(f"dataset {spec.name!r} (kind task): unknown field(s) {unknown}, missing {missing}; "
                          f"expected name, kind, weight, batch_size, {', '.join(TASK_OPTIONS)} (task and data "
                          f"required)")
    return TaskSource(spec.name, model.tokenizer, model.media_token_id, model.eoc_token_id, image_processor,
                      spec.batch_size, seed=seed, rank=rank, world_size=world_size, **spec.options)


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
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check = field_checker("fine-tuning config", ConfigError)

        get_task(self.task)
        check(self.image_size is None or self.image_size >= 1, "image_size", "null or an integer >= 1",
              self.image_size)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(all(0 <= a <= 1 and math.isfinite(a) for a in self.wise_alpha), "wise_alpha",
              "a list of numbers in [0, 1]", self.wise_alpha)
        owned = sorted({"model", "datasets", "init_from"} & set(self.train))
        check(not owned, "train", "training-config fields other than model, datasets and init_from (the "
              "fine-tuning config sets those from base, task and data)", owned)

    def dataset(self) -> dict[str, Any]:
        """The `kind: task` dataset entry of the training config."""
        return {"name": self.task, "kind": "task", "batch_size": self.batch_size, "task": self.task,
                "data": self.data, "max_tokens": self.max_tokens,
                "video_frames": self.video_frames, "video_fps": self.video_fps}

    def model_config(self, base_dir: Path) -> FlamingoConfig:
        """The base model's architecture, with this run's unfrozen parts and resolution."""
        from flamingo.model.weights import CONFIG_FILE

        config = FlamingoConfig.load(base_dir / CONFIG_FILE)
        config.unfreeze = UnfreezeConfig(self.unfreeze.vision, list(self.unfreeze.lm_blocks))
        if self.image_size is not None:
            config.vision.image_size = self.image_size
        config.validate()
        return config

    def train_config(self, base_dir: Path, source: str = "fine-tuning config") -> TrainConfig:
        model = self.model_config(base_dir)
        config = TrainConfig.from_dict({**self.train, "model": model.to_dict(), "datasets": [self.dataset()],
                                        "init_from": str(base_dir)}, source=source)
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
    from flamingo.model.weights import model_directory
    from flamingo.training.trainer import train
    from flamingo.training.wise_ft import wise_ft

    base_dir = model_directory(config.base)
    result = train(config.train_config(base_dir), resume=resume, trust_remote_code=trust_remote_code,
                   base_spec=config.base)
    wise_dirs = []
    if result.final_dir is not None:
        for alpha in config.wise_alpha:
            wise_dirs.append(wise_ft(base_dir, result.final_dir, alpha, result.run_dir / f"wise-ft-{alpha:g}",
                                     overwrite=True, trust_remote_code=trust_remote_code, zero_shot_spec=config.base))
    return result, wise_dirs
