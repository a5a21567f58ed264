"""The configuration of `flamingo pretrain-vision` (contrastive vision-encoder pretraining, paper
B.1.3): one YAML file mapped onto dataclasses, with the same dotted overrides as `flamingo train`.

    vision: {kind: clip, name_or_path: openai/clip-vit-base-patch32}   # any VisionConfig
    text: {name_or_path: google-bert/bert-base-uncased, max_tokens: 64}  # any HF encoder
    embed_dim: 512
    datasets:                       # image-text pairs: shards, a folder or a JSONL file
      - {name: ltip, path: "ltip/{000000..000999}.tar", batch_size: 256, weight: 1.0}
    heldout: {path: heldout.jsonl, every: 1000}                          # retrieval on held-out pairs
    steps: 100000
    optim: {lr: 1.0e-3, weight_decay: 0.1, grad_clip: 10.0}
    schedule: {kind: linear, warmup_steps: 1000}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo.config_io import field_checker, fields_from_dict
from flamingo.model.config import ConfigError, VisionConfig
from flamingo.training.config import (
    MAX_BATCH_SIZE,
    MAX_STEPS,
    MAX_THREADS,
    CheckpointConfig,
    DatasetSpec,
    Device,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    Precision,
    ScheduleConfig,
    YamlConfig,
    _dataset_from_dict,
    read_yaml_mapping,
    run_config_sections,
    with_overrides,
)

VISION_KINDS = ("clip", "siglip", "timm", "efficientnet_lite0", "local")
MAX_EMBED_DIM = 1 << 16  # CLIP's widest shared space is 1024; far wider only exhausts memory


@dataclass
class TextTowerConfig:
    """The language encoder: any Hugging Face encoder model (`AutoModel`, e.g. BERT as in the
    paper) and its tokenizer, from the hub or a local directory. `max_tokens`: captions are cut to
    this many tokens, the tokenizer's start/end tokens included."""

    name_or_path: str = "google-bert/bert-base-uncased"
    revision: str | None = None
    max_tokens: int = 64


@dataclass
class HeldOutConfig:
    """Image-text pairs never trained on (shards, a folder or a JSONL file); every `every`
    updates and at the end, image->text and text->image recall@1 over all of them is logged
    (`heldout/i2t_recall`, `heldout/t2i_recall`; a retrieved caption identical to the pair's own
    counts as a hit, and `heldout/chance` is what random retrieval scores)."""

    path: str | list[str]
    every: int = 1000
    batch_size: int = 64
    max_pairs: int = 10000


@dataclass
class PretrainConfig(YamlConfig):
    """Everything a contrastive pretraining run needs; see the module docstring.

    vision: the image tower (any VisionConfig; timm with `pretrained: false` trains from scratch
        as the paper does). Its spatial features are mean-pooled and projected.
    text: the language tower (TextTowerConfig); its token outputs are mean-pooled and projected.
    datasets: image-text pair datasets (`kind` defaults to pairs); every other key is a field of
        the data pipeline's DatasetConfig (path, batch_size, augment, ...). Each update takes one
        batch of every dataset, each with its own in-batch negatives (across all ranks), and
        accumulates weight * loss of each (the paper's ALIGN + LTIP mix).
    embed_dim: width of the shared embedding space.
    init_temperature / max_logit_scale: the learnable inverse temperature starts at
        1/init_temperature and is clamped to [1, max_logit_scale] after every update (CLIP).
    label_smoothing: of both cross-entropy terms (paper: 0.1).
    run_dir: metrics, checkpoints and the trained tower (RUN_DIR/vision: a directory that
        `vision: {kind: local, name_or_path: RUN_DIR/vision}` loads).
    """

    vision: VisionConfig
    text: TextTowerConfig
    datasets: list[DatasetSpec]
    heldout: HeldOutConfig | None = None
    run_dir: str | None = None
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    label_smoothing: float = 0.1
    steps: int = 1000
    precision: Precision = "fp32"
    device: Device = "auto"
    seed: int = 0
    threads: int | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, no_decay=["logit_scale"],
                                                                   decay_norms_biases_gates=False, grad_clip=10.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="linear", warmup_steps=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check = field_checker("pretrain config", ConfigError)

        check(self.vision.kind in VISION_KINDS, "vision.kind", f"one of {', '.join(VISION_KINDS)}", self.vision.kind)
        check(bool(self.text.name_or_path), "text.name_or_path", "a hub id or a directory", self.text.name_or_path)
        check(self.text.max_tokens >= 3, "text.max_tokens", "an integer >= 3", self.text.max_tokens)
        check(isinstance(self.datasets, list) and len(self.datasets) > 0, "datasets", "a non-empty list",
              self.datasets)
        names = [d.name for d in self.datasets]
        check(len(set(names)) == len(names), "datasets", "unique dataset names", names)
        for i, d in enumerate(self.datasets):
            check(d.kind == "pairs", f"datasets.{i}.kind", "pairs (image-text pairs)", d.kind)
            check(math.isfinite(d.weight) and d.weight >= 0, f"datasets.{i}.weight", "a number >= 0", d.weight)
            check(2 <= d.batch_size <= MAX_BATCH_SIZE, f"datasets.{i}.batch_size",
                  f"an integer in [2, {MAX_BATCH_SIZE}] (in-batch negatives)", d.batch_size)
            check("path" in d.options, f"datasets.{i}.path", "shards, a folder or a .jsonl file", None)
        check(1 <= self.embed_dim <= MAX_EMBED_DIM, "embed_dim", f"an integer in [1, {MAX_EMBED_DIM}]", self.embed_dim)
        check(0 < self.init_temperature <= 1, "init_temperature", "a number in (0, 1]", self.init_temperature)
        check(self.max_logit_scale >= 1 / self.init_temperature, "max_logit_scale",
              f">= 1/init_temperature = {1 / self.init_temperature:g}", self.max_logit_scale)
        check(0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)", self.label_smoothing)
        check(1 <= self.steps <= MAX_STEPS, "steps", f"an integer in [1, {MAX_STEPS:,}]", self.steps)
        check(self.threads is None or 1 <= self.threads <= MAX_THREADS, "threads",
              f"null or an integer in [1, {MAX_THREADS}]", self.threads)
        o, s, c, lg = self.optim, self.schedule, self.checkpoint, self.logging
        check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a number > 0", o.lr)
        check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
        check(o.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0: no clipping)", o.grad_clip)
        check(s.warmup_steps >= 0, "schedule.warmup_steps", "an integer >= 0", s.warmup_steps)
        check(c.every >= 1 and c.keep >= 1, "checkpoint", "every >= 1 and keep >= 1", (c.every, c.keep))
        check(lg.every >= 1, "logging.every", "an integer >= 1", lg.every)
        if self.heldout is not None:
            h = self.heldout
            check(h.every >= 1 and h.batch_size >= 1 and h.max_pairs >= 2, "heldout",
                  "every >= 1, batch_size >= 1, max_pairs >= 2", (h.every, h.batch_size, h.max_pairs))

    @classmethod
    def from_dict(cls, data: Any, source: str = "pretrain config") -> PretrainConfig:
        data, datasets = run_config_sections(data, source, ("vision", "text", "datasets"))
        entries = [{"kind": "pairs", **d} if isinstance(d, dict) else d for d in datasets]
        heldout = data.pop("heldout", None)
        if heldout is not None:
            if not isinstance(heldout, dict) or "path" not in heldout:
                raise ConfigError(f"{source}: heldout: expected a mapping with a path, got {heldout!r}")
            heldout = HeldOutConfig(**fields_from_dict(HeldOutConfig, heldout, source, "heldout", error=ConfigError))
        defaults = cls.__dataclass_fields__
        for key in ("optim", "schedule"):  # given fields override this command's defaults, not the trainer's
            if isinstance(data.get(key), dict):
                data[key] = {**dataclasses.asdict(defaults[key].default_factory()), **data[key]}
        kwargs = fields_from_dict(cls, data, source, skip={"datasets", "heldout"}, error=ConfigError)
        return cls(datasets=[_dataset_from_dict(d, source, f"datasets.{i}") for i, d in enumerate(entries)],
                   heldout=heldout, **kwargs)


def load_pretrain_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a pretraining YAML, apply `key=value` overrides, validate; run_dir defaults to
    runs/<file stem>."""
    path = Path(path)
    data = read_yaml_mapping(path, "pretrain config")
    return PretrainConfig.from_dict(with_overrides(data, overrides, path), source=str(path))
