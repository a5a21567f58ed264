"""LoRA adapters on the frozen language model, with PEFT (`pip install 'flamingo[lora]'`).

`apply_lora(model, LoraSettings(...))` injects PEFT's LoRA layers into the frozen LM's linear layers
whose names match `targets` (its attention and MLP projections: q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj in Llama-style LMs) with `peft.inject_adapter_in_model`, in place: the
Flamingo stays a Flamingo (no PeftModel around it, so nothing re-wraps or re-freezes the decoder
layers our cross-attention blocks are inserted into, the trap peft #723 shows for OpenFlamingo), and
the bridge keeps training as before: only the LoRA matrices are added to what trains. A LoRA layer
starts as the identity (its B matrix is zero), so the model's outputs are unchanged, bit for bit.

The adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
names relative to the LM) by `save_adapters`, read back onto a model by `load_adapters`, and folded
into the LM's weights by `merge_lora`.
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
    adapters' input, and the frozen LM linear layers to adapt, as name patterns (fnmatch, matched
    against the layer's own name, e.g. q_proj, or its path inside the LM, e.g. *.layers.1*.q_proj)."""

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


def lora_targets(model: "Flamingo", patterns: list[str]) -> list[str]:
    """Names (inside `model.lm`) of the frozen LM linear layers matched by `patterns`; never a layer of
    the bridge (cross-attention) or the output head. A pattern matching none is a LoraError."""
    from flamingo.model.quantize import frozen_linears

    names = [name.removeprefix("lm.") for name in frozen_linears(model, vision=False)]
    chosen = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pattern)
                   or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            examples = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise LoraError(f"lora field targets: {pattern!r} matches none of the frozen language model's linear "
                            f"layers (their names: {', '.join(examples[:12])})")
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
    """Inject fresh LoRA adapters into the frozen LM layers `settings.targets` names (see module
    docstring); returns their names inside the LM."""
    targets = lora_targets(model, settings.targets)
    _inject(model, _peft_config(settings, targets))
    return targets


def lora_state_dict(model: "Flamingo") -> dict[str, torch.Tensor]:
    """The adapters' weights, under PEFT's names relative to the LM (empty without adapters)."""
    return _peft().get_peft_model_state_dict(model.lm)


def save_adapters(model: "Flamingo", directory: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors into the existing folder `directory` (beside a
    model's config.yaml and bridge.safetensors)."""
    from flamingo.model.weights import save_tensors

    peft_config = getattr(model.lm, "peft_config", {}).get("default")
    if peft_config is None:
        raise LoraError("this model has no LoRA adapters to save")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_tensors(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory))  # adapter_config.json, PEFT's own writer
    return directory


def load_adapters(model: "Flamingo", directory: str | Path) -> None:
    """Inject the adapters saved in `directory` (by `save_adapters`, or PEFT with names relative to the
    LM) into `model`'s LM and load their weights; the key sets must match exactly."""
    from flamingo.model.weights import load_weights_file

    peft = _peft()
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise LoraError(f"{directory} holds no LoRA adapters (no {ADAPTER_CONFIG_FILE})")
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise LoraError(f"{config_path} is not a readable LoRA adapter config: {err}") from None
    tensors = load_weights_file(directory / ADAPTER_WEIGHTS_FILE)
    _inject(model, config)
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise LoraError(f"{directory / ADAPTER_WEIGHTS_FILE} does not match the model's adapters: missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}")
    peft.set_peft_model_state_dict(model.lm, tensors)


def merge_lora(model: "Flamingo") -> int:
    """Fold every LoRA adapter into the weight of the layer it adapts and put the plain layer back
    (W + alpha/r * B A); returns how many layers were merged. The merged LM computes what the adapted
    one did, up to float rounding."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.lm.get_submodule(parent_name) if parent_name else model.lm
            base: nn.Module = module.get_base_layer()
            setattr(parent, child, base)
            merged += 1
    if hasattr(model.lm, "peft_config"):
        del model.lm.peft_config
    return merged
