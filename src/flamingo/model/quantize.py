"""Weight-only quantization of the frozen backbones with torchao (`pip install 'flamingo[quantize]'`).

`quantize_model(model, "int8" | "int4")` replaces the weights of the frozen linear layers of the
language model (attention and MLP projections) and of the vision tower with torchao's quantized
tensors, in place, on the device the model is on. What is trained stays in its dtype: the
cross-attention blocks, the resampler, the new-token rows and any backbone block unfrozen by
`config.unfreeze`. The output head stays too (it is tied to the input embeddings in most small
LMs, and the decoding shortcuts read its weight directly).

Weight-only quantization shrinks the weights (int8: 1 byte per weight plus one scale per row; int4:
half a byte plus a scale and zero point per group of 32-128 weights); whether it is faster depends
on the backend's kernels (see the "memory and speed" page: on an AVX2 CPU torchao's eager kernels
are slower than fp32). A backend without a kernel for the mode is refused with a `UserError`
before anything is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flamingo.errors import UserError, import_extra

if TYPE_CHECKING:
    from flamingo.model.flamingo import Flamingo

QUANTIZE_MODES = ("int8", "int4")
# int4 weights are quantized in groups along the input dimension (a scale and zero point each); a
# layer takes the first of these group sizes that divides its input width (torchao's CPU kernel
# takes exactly these). Small groups stay closest to the weights: the embedded LM is a Q4_1 GGUF
# file (4-bit groups of 32), which int4 with groups of 32 reproduces to 2e-4 in the logits.
INT4_GROUP_SIZES = (32, 64, 128)
FEATURE = "--quantize (weight-only quantization)"


class QuantizeError(UserError):
    """A quantization mode the backend (device, dtype, torchao build) cannot run."""


class _DropImportNoise(logging.Filter):
    """torchao's import logs a warning for each optional compiled extension it cannot load (its CUDA
    and Python-3.10-only builds) and torch's pytree one per enum torchao registers: noise on every
    model load once torchao is installed (transformers imports it), never actionable here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") or "is an Enum subclass" in message)


_NOISE_FILTER = _DropImportNoise()


def quiet_torchao_import() -> None:
    """Drop torchao's import-time warnings (see `_DropImportNoise`); other torchao messages pass."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)


def check_quantize_mode(mode: str | None) -> str | None:
    """`mode` if it is None or one of QUANTIZE_MODES (then torchao must import: MissingExtra
    otherwise), else a UserError naming them. Called before a model load, so mistakes come first."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise QuantizeError(f"quantize={mode!r}: expected one of {', '.join(QUANTIZE_MODES)} (or None)")
    if mode is not None:
        _torchao()
    return mode


def _torchao() -> Any:
    quiet_torchao_import()
    return import_extra("torchao", "quantize", FEATURE)


def _config_factory(mode: str, device: torch.device) -> Callable[[int], Any] | None:
    """group size -> torchao config of `mode` for weights on `device`, or None when torchao has no
    weight-only kernel of that mode for the device type."""
    _torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: loading a model must not change torch.compile's global settings.
    if mode == "int8":
        return lambda group_size: Int8WeightOnlyConfig(set_inductor_config=False)
    if device.type == "cpu":  # the tinygemm CPU kernel (aten._weight_int4pack_mm_for_cpu), in torchao's prototype
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return lambda group_size: PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    if device.type == "cuda":  # the tinygemm CUDA kernel (aten._weight_int4pack_mm; bfloat16 activations)
        return lambda group_size: Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                                       set_inductor_config=False)
    return None


def _probe(mode: str, make_config: Callable[[int], Any], device: torch.device, dtype: torch.dtype) -> None:
    """Quantize and run one small linear layer as the model's will be: a backend without the kernel
    fails here (ImportError, NotImplementedError, RuntimeError ...), before the model is touched."""
    from torchao.quantization import quantize_

    group_size = INT4_GROUP_SIZES[0]
    layer = nn.Linear(2 * group_size, 64, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    quantize_(layer, make_config(group_size))
    with torch.no_grad():
        out = layer(torch.ones(2, 2 * group_size, device=device, dtype=dtype))
    if type(layer.weight.data) is torch.Tensor:
        raise RuntimeError("torchao left the weight unquantized")
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the quantized layer computes non-finite values")


def frozen_linears(model: "Flamingo", *, vision: bool = True) -> dict[str, nn.Linear]:
    """The linear layers weight-only quantization replaces, by qualified name: the frozen LM's (not its
    output head) and, with `vision`, the frozen vision tower's; never a layer inside a trained module
    (cross-attention, resampler, new-token rows, unfrozen backbone blocks) or one whose weight trains."""
    trained = {id(sub) for module in model.trainable_modules().values() for sub in module.modules()}
    head = model.lm.get_output_embeddings()
    excluded = trained | ({id(sub) for sub in head.modules()} if head is not None else set())
    roots = {"lm": model.lm}
    if vision and model.vision_encoder is not None:
        roots["vision_encoder"] = model.vision_encoder
    found: dict[str, nn.Linear] = {}
    for prefix, root in roots.items():
        for name, module in root.named_modules():
            if (isinstance(module, nn.Linear) and id(module) not in excluded
                    and not module.weight.requires_grad and type(module.weight.data) is torch.Tensor
                    and module.weight.is_floating_point()):
                found[f"{prefix}.{name}"] = module
    return found


def _group_size(layer: nn.Linear) -> int | None:
    return next((size for size in INT4_GROUP_SIZES if layer.in_features % size == 0), None)


def quantize_model(model: "Flamingo", mode: str, *, vision: bool = True) -> dict[str, str]:
    """Weight-only quantize the frozen linear layers of `model` (`frozen_linears`) in place, with
    torchao, for the device they are on (move the model first: quantized int4 weights are packed
    for one backend). Returns {layer name: how it was quantized, or why it was left} for every
    candidate layer. Raises QuantizeError (a UserError) when the backend has no kernel for `mode`,
    MissingExtra when torchao is not installed."""
    check_quantize_mode(mode)
    layers = frozen_linears(model, vision=vision)
    if not layers:
        return {}
    first = next(iter(layers.values())).weight
    make_config = _config_factory(mode, first.device)
    backend = f"{first.device.type} {str(first.dtype).removeprefix('torch.')}"
    import torchao

    if make_config is None:
        raise QuantizeError(f"quantize {mode}: torchao {torchao.__version__} has no {mode} weight-only kernel for "
                            f"{backend} weights; use int8, or run on cpu or cuda")
    try:
        _probe(mode, make_config, first.device, first.dtype)
    except (ImportError, NotImplementedError, RuntimeError, AssertionError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise QuantizeError(f"quantize {mode}: torchao {torchao.__version__} cannot run {mode} weight-only "
                            f"layers on {backend} weights here ({type(err).__name__}: {reason})"
                            + ("; int8 works on every backend" if mode != "int8" else "")) from None
    from torchao.quantization import quantize_

    report: dict[str, str] = {}
    by_group: dict[int, set[int]] = {}
    for name, layer in layers.items():
        size = _group_size(layer) if mode == "int4" else 0
        if size is None:
            report[name] = f"kept: input width {layer.in_features} is not a multiple of {INT4_GROUP_SIZES[0]}"
            continue
        by_group.setdefault(size, set()).add(id(layer))
        report[name] = mode if mode == "int8" else f"int4 (group size {size})"
    for size, chosen in by_group.items():
        quantize_(model, make_config(size), filter_fn=lambda module, fqn, chosen=chosen: id(module) in chosen)
    _detach_from_checkpoint(model.lm)
    return report


def _detach_from_checkpoint(lm: nn.Module) -> None:
    """Copy the LM's remaining frozen float tensors (embeddings, norms, the head) into memory of their
    own. Loaded from safetensors, they are views into the checkpoint's memory map, which keeps the
    whole file resident, the replaced float weights included (the embedded LM: 513 MiB after int8)."""
    with torch.no_grad():
        for tensor in {id(t): t for t in [*lm.parameters(), *lm.buffers()]}.values():
            if type(tensor.data) is torch.Tensor and not tensor.requires_grad:
                tensor.data = tensor.data.clone()
