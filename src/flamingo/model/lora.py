"""LoRA adapters on the frozen language model and the cross-attention layers, with PEFT
(`pip install 'flamingo[lora]'`).

`apply_lora(model, LoraSettings(...))` injects PEFT's LoRA layers into the linear layers whose names
match `targets`: the frozen LM's attention and MLP projections (q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj in Llama-style LMs) and/or our cross-attention layers (to_q, to_kv,
to_out, fc1, fc2, fc_up inside `cross_attn`), with `peft.inject_adapter_in_model`, in place: the
Flamingo stays a Flamingo (no PeftModel around it, so nothing re-wraps or re-freezes the decoder
layers our cross-attention blocks are inserted into, the trap peft #723 shows for OpenFlamingo), and
the bridge keeps training as it did (freeze it with `optim.lr_scale` 0 in a training config): only
the LoRA matrices are added to what trains. A LoRA layer starts as the identity (its B matrix is
zero), so the model's outputs are unchanged, bit for bit. The bridge's saved weights keep their
names (`Flamingo.trainable_state_dict` leaves PEFT's `base_layer` level and the adapters out).

The adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
names relative to the LM, our wrapped decoder layers included) by `save_adapters`, beside a model
directory's config.yaml and bridge.safetensors; `load_adapters` reads them back onto a model, and
`merge_lora` folds them into the weights of the layers they adapt.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flamingo.config_io import field_checker, fields_from_dict
from flamingo.errors import UserError, import_extra
from flamingo.model.tensor_files import load_weights_file, save_tensors

if TYPE_CHECKING:
    from flamingo.model.flamingo import Flamingo

ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's names
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
FEATURE = "LoRA (lora: in a training config)"
MAX_RANK = 4096


class LoraError(UserError):
    """A LoRA setting or adapter directory that does not fit the model."""


@dataclass
class LoraSettings:
    """The `lora:` section: rank r, alpha (the update is scaled by alpha / r), dropout on the
    adapters' input, and the linear layers to adapt, as name patterns (fnmatch, matched against the
    layer's own name, e.g. q_proj or to_q, or its path inside the LM, e.g. *.layers.1*.q_proj or
    *cross_attn*): the frozen LM's projections, the cross-attention layers, or both."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        check = field_checker("lora", LoraError)
        check(1 <= self.rank <= MAX_RANK, "rank", f"an integer in [1, {MAX_RANK}]", self.rank)
        check(self.alpha > 0 and self.alpha < float("inf"), "alpha", "a finite number > 0", self.alpha)
        check(0 <= self.dropout < 1, "dropout", "a number in [0, 1)", self.dropout)
        check(bool(self.targets) and all(isinstance(t, str) and t for t in self.targets), "targets",
              "a non-empty list of layer name patterns (e.g. [q_proj, v_proj])", self.targets)

    @classmethod
    def from_dict(cls, data: Any, source: str = "lora") -> "LoraSettings":
        return cls(**fields_from_dict(cls, data, source, error=LoraError))


def _peft() -> Any:
    return import_extra("peft", "lora", FEATURE)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is one of PEFT's LoRA parameters (lora_A, lora_B, ...)."""
    return any(part.startswith("lora_") for part in name.split("."))


def adaptable_layers(model: "Flamingo") -> list[str]:
    """Names inside `model.lm` of the linear layers LoRA may adapt: the frozen LM's (not its output
    head, nor a backbone block unfrozen for training) and the cross-attention blocks'."""
    from flamingo.model.quantize import frozen_linears

    frozen = set(frozen_linears(model, vision=False).values())
    bridge = {sub for block in model.cross_attn_layers.values() for sub in block.modules()}
    return [name for name, module in model.lm.named_modules()
            if isinstance(module, nn.Linear) and (module in frozen or module in bridge)]


def lora_targets(model: "Flamingo", patterns: list[str]) -> list[str]:
    """Names (inside `model.lm`) of the layers `adaptable_layers` lists that `patterns` match; a
    pattern matching none is a LoraError."""
    names = adaptable_layers(model)
    chosen = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pattern)
                   or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            examples = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise LoraError(f"lora field targets: {pattern!r} matches none of the linear layers LoRA can adapt "
                            f"(the frozen language model's and the cross-attention layers': {', '.join(examples)})")
        chosen += [n for n in matched if n not in chosen]
    return chosen


def _peft_config(settings: LoraSettings, targets: list[str]) -> Any:
    peft = _peft()
    # A regex that matches exactly the chosen layers (PEFT full-matches a string target against names).
    return peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           target_modules="^(" + "|".join(re.escape(n) for n in targets) + ")$", bias="none")


def _inject(model: "Flamingo", config: Any) -> None:
    """PEFT's injection leaves only the adapters trainable: what trained before (the bridge, unfrozen
    blocks) trains again afterwards."""
    trained = [p for p in model.parameters() if p.requires_grad]
    _peft().inject_adapter_in_model(config, model.lm)
    for param in trained:
        param.requires_grad_(True)


def apply_lora(model: "Flamingo", settings: LoraSettings) -> list[str]:
    """Inject fresh LoRA adapters into the layers `settings.targets` names (see module docstring);
    returns their names inside the LM."""
    targets = lora_targets(model, settings.targets)
    _inject(model, _peft_config(settings, targets))
    return targets


def has_lora(model: "Flamingo") -> bool:
    return "default" in getattr(model.lm, "peft_config", {})


def lora_parameters(model: "Flamingo") -> dict[str, nn.Parameter]:
    """The adapters' parameters by name inside the LM (PEFT's, adapter name included)."""
    return {name: param for name, param in model.lm.named_parameters() if is_adapter_parameter(name)}


def lora_state_dict(model: "Flamingo") -> dict[str, torch.Tensor]:
    """The adapters' weights, under PEFT's names relative to the LM (empty without adapters). Under
    FSDP2 every rank must call it: PEFT gathers the shards (a collective)."""
    return _peft().get_peft_model_state_dict(model.lm)


def write_adapters(model: "Flamingo", directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """adapter_config.json (the model's adapters') + `tensors` (`lora_state_dict`'s) as
    adapter_model.safetensors into the existing folder `directory`."""
    if not has_lora(model):
        raise LoraError("this model has no LoRA adapters to save")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_tensors(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    model.lm.peft_config["default"].save_pretrained(str(directory))  # adapter_config.json, PEFT's own writer


def save_adapters(model: "Flamingo", directory: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors into the existing folder `directory` (beside a
    model's config.yaml and bridge.safetensors)."""
    write_adapters(model, directory, lora_state_dict(model))
    return Path(directory)


def has_adapters(directory: str | Path) -> bool:
    """Whether a (model or checkpoint) directory holds LoRA adapters."""
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


def copy_adapters(source: str | Path, directory: str | Path, scale: float = 1.0) -> None:
    """Copy the adapters saved in `source` into the existing folder `directory`, their update scaled
    by `scale` (the B matrices multiplied: W + scale * alpha/r * B A, WiSE-FT's interpolation of the
    adapted layers' weights)."""
    source, directory = Path(source), Path(directory)
    tensors = load_weights_file(source / ADAPTER_WEIGHTS_FILE)
    tensors = {k: v * scale if ".lora_B." in k else v for k, v in tensors.items()}
    save_tensors(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_bytes((source / ADAPTER_CONFIG_FILE).read_bytes())


def load_adapter_weights(model: "Flamingo", directory: str | Path) -> None:
    """Load the weights saved in `directory` into the model's adapters (injected already, e.g. by
    `apply_lora` when a training run resumes); names and shapes must match exactly."""
    path = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise LoraError(f"{directory} holds no LoRA adapters (no {ADAPTER_WEIGHTS_FILE})")
    tensors = load_weights_file(path)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    mis_shaped = sorted(f"{k}: expected {tuple(expected[k].shape)}, got {tuple(tensors[k].shape)}"
                        for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or mis_shaped:
        raise LoraError(f"{path} does not match the model's adapters: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, mis-shaped {mis_shaped[:5]}")
    _peft().set_peft_model_state_dict(model.lm, tensors)


def load_adapters(model: "Flamingo", directory: str | Path) -> None:
    """Inject the adapters saved in `directory` (by `save_adapters`, or PEFT with names relative to the
    LM) into `model`'s LM and load their weights; the key sets must match exactly."""
    peft = _peft()
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise LoraError(f"{directory} holds no LoRA adapters (no {ADAPTER_CONFIG_FILE})")
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise LoraError(f"{config_path} is not a readable LoRA adapter config: {err}") from None
    if not (directory / ADAPTER_WEIGHTS_FILE).is_file():
        raise LoraError(f"{directory} holds no LoRA adapter weights (no {ADAPTER_WEIGHTS_FILE})")
    _inject(model, config)
    load_adapter_weights(model, directory)


def merge_lora(model: "Flamingo") -> list[str]:
    """Fold every LoRA adapter into the weight of the layer it adapts and put the plain layer back
    (W + alpha/r * B A); returns the names (inside the LM) of the layers merged. The merged model
    computes what the adapted one did, up to float rounding."""
    from peft.tuners.lora import LoraLayer

    merged = []
    for name, module in list(model.lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.lm.get_submodule(parent_name) if parent_name else model.lm
            base: nn.Module = module.get_base_layer()
            setattr(parent, child, base)
            merged.append(name)
    if hasattr(model.lm, "peft_config"):
        del model.lm.peft_config
    return merged
