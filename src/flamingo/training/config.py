"""The training configuration: one YAML file mapped onto dataclasses, plus dotted overrides.

    model: {...}            # a FlamingoConfig (see flamingo.model.config), or a path to its YAML
    datasets:               # one entry per dataset; see `DatasetSpec`
      - {name: m3w, kind: interleaved, path: "m3w/{000000..000999}.tar", weight: 1.0, batch_size: 8}
    steps: 500000
    optim: {lr: 1.0e-4, weight_decay: 0.1, grad_clip: 1.0}
    schedule: {kind: constant, warmup_steps: 5000}
    ...

`load_train_config(path, ["optim.lr=3e-4", "model.cross_attention.every=2"])` reads the file,
applies the overrides to the raw mapping (dotted keys; list items by index, `datasets.0.weight=0.5`;
values parsed as YAML) and builds a validated `TrainConfig`. Every error is a `ConfigError` that
names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flamingo.config_io import MAX_SEED, field_checker, fields_from_dict, load_structured, safe_yaml, short
from flamingo.model.config import ConfigError, FlamingoConfig
from flamingo.model.lora import LoraSettings

Precision = Literal["fp32", "bf16"]
FrozenDtype = Literal["auto", "float32", "bfloat16"]
Objective = Literal["accumulate", "round_robin"]
ScheduleKind = Literal["constant", "cosine", "linear"]
Strategy = Literal["ddp", "fsdp"]
Device = Literal["auto", "cpu", "cuda"]
MAX_BATCH_SIZE = 1 << 16
MAX_STEPS = 10**9  # 2000x the paper's 500k updates; more would run for decades, not a plan
MAX_THREADS = 1024  # more than any machine's cores; torch starts them all (100000 crash the process)


@dataclass
class DatasetSpec:
    """One training dataset.

    name: label (per-dataset losses, data positions); unique.
    kind: "synthetic_shapes" (in-memory coloured shapes), "procedural" (in-memory scenes and
        few-shot episodes, `flamingo.data.procedural`; see `flamingo.data.synthetic`), "clipart"
        (the same over real drawn objects, `flamingo.data.clipart`), "task"
        (a benchmark's training annotations in the evaluation's prompt format, options task, data,
        ...: `flamingo.training.finetune`), or a kind
        of the data pipeline ("interleaved", "pairs", "video": `flamingo.data.DatasetConfig`).
    weight: lambda_m, the dataset's weight in the summed objective (paper: M3W 1.0, ALIGN 0.2,
        LTIP 0.2, VTP 0.03).
    batch_size: samples per micro-batch and device.
    options: every other key of the entry, handed to the dataset as is (e.g. path, max_tokens,
        max_images, p_next for the pipeline; images_per_sample for synthetic_shapes; tasks
        {caption|qa|binding|induction: weight} and image_size for procedural; the same plus scene
        tasks, and root, for clipart).
    """

    name: str
    kind: str
    weight: float = 1.0
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping of the YAML entry (and of the data pipeline's DatasetConfig)."""
        return {"name": self.name, "kind": self.kind, "weight": self.weight, "batch_size": self.batch_size,
                **self.options}


@dataclass
class OptimConfig:
    """AdamW (paper: lr 1e-4, weight decay 0.1 except the Perceiver Resampler, clipping 1.0).

    no_decay: trainable parameters whose name (as in `Flamingo.trainable_state_dict`: perceiver.*,
        cross_attn.<i>.*, new_token_embeddings.*, new_token_logits.*) equals or starts with one of
        these prefixes get no weight decay. The paper excludes only the resampler.
    decay_norms_biases_gates: the paper decays every other trainable parameter, LayerNorms, biases
        and the tanh gates included (true); false also exempts every parameter with <= 1 dimension,
        the common practice elsewhere.
    grad_clip: global L2-norm clipping threshold; 0 disables clipping (the norm is still logged).
    lr_scale: learning-rate multipliers by parameter-name prefix (longest prefix wins), e.g.
        {perceiver: 0.1}; 0 freezes those parameters at their initial values.
    lr_delay: updates during which parameters under a prefix stay at their initial values, e.g.
        {perceiver: 300}; afterwards their learning rate warms up linearly over
        schedule.warmup_steps updates (a second warmup, as for a newly unfrozen part).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: ["perceiver"])
    decay_norms_biases_gates: bool = True
    grad_clip: float = 1.0
    lr_scale: dict[str, float] = field(default_factory=dict)
    lr_delay: dict[str, int] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Linear warmup from 0 to `optim.lr` over `warmup_steps` updates, then constant (the paper),
    or a cosine or linear (the paper's contrastive pretraining) decay to `min_lr_ratio * lr` at
    the last step."""

    kind: ScheduleKind = "constant"
    warmup_steps: int = 5000
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    """Atomic checkpoints every `every` updates (and at the end) under `dir` (default
    RUN_DIR/checkpoints); the last `keep` are kept."""

    dir: str | None = None
    every: int = 1000
    keep: int = 3


@dataclass
class LoggingConfig:
    """Metrics every `every` updates into RUN_DIR/metrics.jsonl (and TensorBoard under
    RUN_DIR/tensorboard when `tensorboard` is true); `progress_bar`: a tqdm bar on rank 0."""

    every: int = 10
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class DistributedConfig:
    """How a multi-process run (torchrun, WORLD_SIZE > 1) shares the work; a single process
    ignores this section.

    strategy: "ddp" (replicated model, gradients all-reduced) or "fsdp" (FSDP2 `fully_shard` per
        decoder block, the vision encoder, the resampler and the rest: frozen and trainable
        weights, gradients and optimizer state sharded).
    backend: "nccl" / "gloo"; null picks nccl on CUDA, gloo on CPU.
    find_unused_parameters: DDP only; needed when some step leaves trainable parameters unused
        (e.g. text-only batches never reach the resampler).
    """

    strategy: Strategy = "ddp"
    backend: str | None = None
    find_unused_parameters: bool = True
    timeout_minutes: float = 30.0


class YamlConfig:
    """`to_dict` (the YAML form, see `config_dict`) and `to_yaml` of a run config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass
class TrainConfig(YamlConfig):
    """Everything a training run needs; see the module docstring and configs/train/.

    run_dir: where metrics, checkpoints and the final model go (null: runs/<config file stem>).
    init_from: a saved model directory (config.yaml + bridge.safetensors) whose trainable
        weights start the run (the model section must describe the same architecture; backbone
        parts unfrozen by model.unfreeze and absent from it start from their pretrained values).
        A converted IDEFICS or Llama 3.2 Vision directory (`flamingo convert`) is also the model
        the run builds, its frozen backbones included (the model section: its config.yaml, only
        `unfreeze` may differ; `kind: task` and `pairs` datasets only, `flamingo.training.data.check_family`).
    steps: optimizer updates in all.
    accumulation: micro-batches of every dataset per update (gradient accumulation).
    objective: "accumulate" (every update sums the weighted losses of all datasets, the paper's
        choice) or "round_robin" (update k uses dataset k mod M only, the paper's ablation).
    precision: "fp32", or "bf16" autocast (trainable weights and optimizer state stay fp32).
    frozen_dtype: storage dtype of the frozen LM and vision encoder; "auto" is bfloat16 with
        bf16 precision on a CUDA device that supports it, else the dtype they were loaded in.
    gradient_checkpointing: recompute each decoder block in the backward pass.
    device: "auto" (CUDA when available), "cpu" or "cuda".
    threads: torch CPU threads per process (null: torch's default; under torchrun on CPU,
        the cores divided among the local processes).
    max_nonfinite_in_a_row: stop when this many consecutive updates had a non-finite loss or
        gradient norm (each one is skipped and counted).
    lora: LoRA adapters trained beside the bridge (flamingo.model.lora.LoraSettings: rank, alpha,
        dropout, targets), saved in PEFT's format in every checkpoint and the final model; null: none.
        Their parameters are named lora.<name in the LM> for optim.no_decay / lr_scale / lr_delay;
        freeze the bridge with lr_scale {perceiver: 0, cross_attn: 0, new_token_embeddings: 0}.
    """

    model: FlamingoConfig
    datasets: list[DatasetSpec]
    run_dir: str | None = None
    init_from: str | None = None
    steps: int = 1000
    accumulation: int = 1
    objective: Objective = "accumulate"
    precision: Precision = "fp32"
    frozen_dtype: FrozenDtype = "auto"
    gradient_checkpointing: bool = False
    device: Device = "auto"
    seed: int = 0
    threads: int | None = None
    max_nonfinite_in_a_row: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check = field_checker("train config", ConfigError)

        check(isinstance(self.datasets, list) and len(self.datasets) > 0, "datasets", "a non-empty list",
              self.datasets)
        names = [d.name for d in self.datasets]
        check(len(set(names)) == len(names), "datasets", "unique dataset names", names)
        for i, d in enumerate(self.datasets):
            check(isinstance(d.name, str) and bool(d.name), f"datasets.{i}.name", "a non-empty string", d.name)
            check(isinstance(d.kind, str) and bool(d.kind), f"datasets.{i}.kind", "a non-empty string", d.kind)
            check(math.isfinite(d.weight) and d.weight >= 0, f"datasets.{i}.weight", "a number >= 0", d.weight)
            check(1 <= d.batch_size <= MAX_BATCH_SIZE, f"datasets.{i}.batch_size", f"an integer in 1..{MAX_BATCH_SIZE}",
                  d.batch_size)
        if self.distributed.strategy == "fsdp":
            for i, d in enumerate(self.datasets):
                # A rank whose batch holds no image would skip the resampler's FSDP collectives
                # while the other ranks wait in them: a hang, not an error.
                check(d.options.get("min_images", 1) != 0, f"datasets.{i}.min_images",
                      ">= 1 under distributed.strategy fsdp (every batch must hold an image on every rank)",
                      d.options.get("min_images"))
        check(1 <= self.steps <= MAX_STEPS, "steps", f"an integer in [1, {MAX_STEPS:,}]", self.steps)
        check(self.accumulation >= 1, "accumulation", "an integer >= 1", self.accumulation)
        check(0 <= self.seed <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]", self.seed)  # keyed_rng's keys
        check(self.threads is None or 1 <= self.threads <= MAX_THREADS, "threads",
              f"null or an integer in [1, {MAX_THREADS}]", self.threads)
        check(self.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "an integer >= 1",
              self.max_nonfinite_in_a_row)
        o, s, c, lg = self.optim, self.schedule, self.checkpoint, self.logging
        check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a number > 0", o.lr)
        check(all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
        check(o.eps > 0, "optim.eps", "a number > 0", o.eps)
        check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
        check(o.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0: no clipping)", o.grad_clip)
        check(isinstance(o.lr_scale, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                                                   for k, v in o.lr_scale.items()),
              "optim.lr_scale", "a mapping of parameter-name prefixes to numbers >= 0", o.lr_scale)
        check(isinstance(o.lr_delay, dict) and all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                                   for k, v in o.lr_delay.items()),
              "optim.lr_delay", "a mapping of parameter-name prefixes to integers >= 0", o.lr_delay)
        check(s.warmup_steps >= 0, "schedule.warmup_steps", "an integer >= 0", s.warmup_steps)
        check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a number in [0, 1]", s.min_lr_ratio)
        check(c.every >= 1, "checkpoint.every", "an integer >= 1", c.every)
        check(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep)
        check(lg.every >= 1, "logging.every", "an integer >= 1", lg.every)
        check(self.distributed.timeout_minutes > 0, "distributed.timeout_minutes", "a number > 0",
              self.distributed.timeout_minutes)

    @property
    def weights(self) -> dict[str, float]:
        return {d.name: d.weight for d in self.datasets}

    @classmethod
    def from_dict(cls, data: Any, source: str = "train config") -> TrainConfig:
        data, datasets = run_config_sections(data, source, ("model", "datasets"))
        model = data.pop("model")
        if not isinstance(model, dict):
            raise ConfigError(f"{source}: model: expected a mapping (a FlamingoConfig) or a path to one, "
                              f"got {type(model).__name__}")
        lora = data.pop("lora", None)
        kwargs = fields_from_dict(cls, data, source, skip={"model", "datasets", "lora"}, error=ConfigError)
        return cls(model=FlamingoConfig(**fields_from_dict(FlamingoConfig, model, source, "model", error=ConfigError)),
                   datasets=[_dataset_from_dict(d, source, f"datasets.{i}") for i, d in enumerate(datasets)],
                   lora=None if lora is None else LoraSettings.from_dict(lora, f"{source}: lora"), **kwargs)


def run_config_sections(data: Any, source: str, required: tuple[str, ...]) -> tuple[dict[str, Any], list[Any]]:
    """A run config's top-level mapping (a copy, its required sections checked) without its
    `datasets` list, and that list."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing required section(s) {missing}")
    datasets = data.pop("datasets")
    if not isinstance(datasets, list):
        raise ConfigError(f"{source}: datasets: expected a list of mappings, got {type(datasets).__name__}")
    return data, datasets


def config_dict(config: Any) -> dict[str, Any]:
    """The plain mapping (the YAML form) of a run config dataclass: sections with a `to_dict`
    (the model, dataset entries) through it, other dataclass sections field by field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "to_dict"):
            out[f.name] = value.to_dict()
        elif isinstance(value, list) and value and all(hasattr(v, "to_dict") for v in value):
            out[f.name] = [v.to_dict() for v in value]
        elif dataclasses.is_dataclass(value):
            out[f.name] = _plain(dataclasses.asdict(value))
        else:
            out[f.name] = value
    return out


# ------------------------------------------------------------------------------------ loading
def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a training YAML, apply `key=value` overrides, validate. A `model:` given as a path
    is read relative to the training config's folder; run_dir defaults to runs/<file stem>."""
    path = Path(path)
    data = read_yaml_mapping(path, "train config")
    if isinstance(data.get("model"), str):
        model_path = Path(data["model"])
        if not model_path.is_absolute():
            model_path = path.parent / model_path
        data["model"] = load_structured(model_path, f"{path}: model: config file", ConfigError)
    return TrainConfig.from_dict(with_overrides(data, overrides, path), source=str(path))


def with_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...], path: Path) -> dict[str, Any]:
    """The raw mapping of the run config file `path` with the dotted `key=value` overrides applied
    and run_dir defaulting to runs/<file stem>."""
    for item in overrides:
        apply_override(data, item)
    if data.get("run_dir") is None:
        data["run_dir"] = str(Path("runs") / path.stem)
    return data


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file, read safely (flamingo.config_io); a ConfigError
    naming the file otherwise."""
    data = load_structured(path, f"{what} file", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {short(item)}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    try:
        value = safe_yaml(text, f"override {short(key)}", ConfigError) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        value = _number_or_str(value)
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set a dotted key in the raw config mapping (lists indexed by number)."""
    parts, value = parse_override(item)
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where, item)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {short(item)}: {where} is not a section (it is {short(node)})")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {short(item)}: {where} is a value ({short(node)}), not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(parts), item)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {short(item)}: {where} must index the list (0..{len(node) - 1})")
    return int(part)


def _number_or_str(text: str) -> Any:
    # YAML 1.1 reads "3e-4" as a string; a number is what anyone writing it means.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------- typed conversion
def _dataset_from_dict(entry: Any, source: str, where: str) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping with name, kind, ..., got {short(entry)}")
    for key in ("name", "kind"):
        if key not in entry:
            raise ConfigError(f"{source}: {where}: missing required field {key!r}")
    entry = dict(entry)
    if isinstance(entry.get("options"), dict):  # the to_dict() form nests nothing, but accept it
        entry.update(entry.pop("options"))
    known = {"name", "kind", "weight", "batch_size"}
    options = {k: v for k, v in entry.items() if k not in known}
    base = {k: v for k, v in entry.items() if k in known}
    kwargs = fields_from_dict(DatasetSpec, base, source, where, skip={"options"}, error=ConfigError)
    return DatasetSpec(options=options, **kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
