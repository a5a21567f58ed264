"""Converting OpenFlamingo checkpoints (Awadalla et al., 2023; `open_flamingo` v2) into this model.

OpenFlamingo saves the whole `Flamingo` module's state dict (or, from its training script, the
trainable part of it plus the LM's input embedding table):

    perceiver.latents, perceiver.layers.{i}.0.* (attention), perceiver.layers.{i}.1.{0,1,3}.*
        (feed-forward: LayerNorm, Linear, GELU, Linear), perceiver.norm.*, [perceiver.frame_embs]
    lang_encoder.<decoder path>.{idx}.gated_cross_attn_layer.{attn_gate, ff_gate, attn.*, ff.*}
        (also mirrored as lang_encoder.gated_cross_attn_layers.{idx}.*)
    lang_encoder.<input embedding>.weight: the resized table, in which the rows of
        `<|endofchunk|>` and `<image>` were trained
    vision_encoder.*, the rest of lang_encoder.*: the frozen backbones

`convert_openflamingo_state_dict` maps that onto `Flamingo.trainable_state_dict()` keys;
`load_openflamingo_checkpoint` reads a file without unpickling arbitrary objects;
`convert_openflamingo` does both and saves the result with `save_pretrained`.

The architecture must be OpenFlamingo's (see `FlamingoConfig.openflamingo`): OpenFlamingo's
module sizes are fixed in its code (8 heads of 64, GELU, no biases, no input projection), and a
config that differs in a way the weight shapes cannot reveal (the head split, the activation) is
refused rather than silently producing a different model.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flamingo.model.config import FlamingoConfig
from flamingo.model.flamingo import Flamingo
from flamingo.model.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    build_flamingo,
    load_trainable_weights,
    save_pretrained,
)
from flamingo.outputs import check_output_dir

__all__ = [
    "convert_openflamingo",
    "convert_openflamingo_state_dict",
    "load_openflamingo_checkpoint",
]

# OpenFlamingo's fixed module sizes (open_flamingo/src/helpers.py defaults, used by Flamingo).
_OF_HEADS, _OF_HEAD_DIM, _OF_FFW_MULT = 8, 64, 4

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)

# Perceiver: OpenFlamingo name (after "perceiver.") -> ours.
_PERCEIVER_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^latents$"), "latents"),
    (re.compile(r"^frame_embs$"), "temporal_embeddings"),
    (re.compile(r"^layers\.(\d+)\.0\.(norm_media|norm_latents|to_q|to_kv|to_out)\.(weight|bias)$"),
     r"layers.\1.attn.\2.\3"),
    (re.compile(r"^layers\.(\d+)\.1\.0\.(weight|bias)$"), r"layers.\1.ffw.norm.\2"),
    (re.compile(r"^layers\.(\d+)\.1\.1\.(weight|bias)$"), r"layers.\1.ffw.fc1.\2"),
    (re.compile(r"^layers\.(\d+)\.1\.3\.(weight|bias)$"), r"layers.\1.ffw.fc2.\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
]

# GATED XATTN-DENSE: OpenFlamingo name (after "gated_cross_attn_layer.") -> ours.
_XATTN_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^attn_gate$"), "attn_gate"),
    (re.compile(r"^ff_gate$"), "ffw_gate"),
    (re.compile(r"^attn\.(norm|to_q|to_kv|to_out)\.(weight|bias)$"), r"attn.\1.\2"),
    (re.compile(r"^ff\.0\.(weight|bias)$"), r"ffw.norm.\1"),
    (re.compile(r"^ff\.1\.(weight|bias)$"), r"ffw.fc1.\1"),
    (re.compile(r"^ff\.3\.(weight|bias)$"), r"ffw.fc2.\1"),
]

_XATTN_IN_DECODER = re.compile(r"^lang_encoder\.(?P<path>.+)\.(?P<idx>\d+)\.gated_cross_attn_layer\.(?P<name>.+)$")
_XATTN_MIRROR = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(?P<idx>\d+)\.(?P<name>.+)$")
# Wrapper segments that distributed training / activation checkpointing insert into names.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")


def _apply_rules(rules: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


# --------------------------------------------------------------------------------- loading
def load_openflamingo_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an OpenFlamingo checkpoint file into a dict, never unpickling arbitrary objects.

    `.pt`/`.pth`/`.bin`/`.ckpt` go through `torch.load(..., weights_only=True)` (tensors and plain
    containers only); `.safetensors` through safetensors. The result may still be wrapped
    ({"model_state_dict": ...}, DDP "module." prefixes): `convert_openflamingo_state_dict`
    unwraps it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"OpenFlamingo checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"OpenFlamingo checkpoint {path} is not a readable safetensors file: {err}") from None
    if suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"OpenFlamingo checkpoint {path}: unknown file type {path.suffix!r}; expected one of "
                              f"{', '.join(_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES)}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
        detail = detail.group(1).strip() if detail else (text.splitlines()[0] if text else type(err).__name__)
        if "Unsupported global" in text:
            raise CheckpointError(
                f"OpenFlamingo checkpoint {path} was refused by the safe loader (torch.load weights_only=True): it "
                f"contains pickled objects other than tensors and plain containers, which are never unpickled "
                f"here ({detail}); re-save its state dict (tensors only), e.g. as .safetensors") from None
        raise CheckpointError(f"OpenFlamingo checkpoint {path} is not a loadable PyTorch checkpoint: {detail}") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"OpenFlamingo checkpoint {path} is not a loadable PyTorch checkpoint: "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"OpenFlamingo checkpoint {path}: expected a state dict (a mapping of names to "
                              f"tensors), got {type(data).__name__}")
    return data


def _unwrap(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{"model_state_dict": sd, ...} / {"state_dict": sd} / DDP-prefixed -> a flat name -> tensor dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"expected an OpenFlamingo state dict, got {type(state).__name__}")
    if not any(isinstance(v, torch.Tensor) for v in state.values()):  # a training checkpoint
        for wrapper in ("model_state_dict", "state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"OpenFlamingo state dict has entries that are not tensors: {not_tensors[:10]}"
                              f"{' ...' if len(not_tensors) > 10 else ''}")
    if state and all(k.startswith("module.") for k in state):  # DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return {_WRAPPER_SEGMENTS.sub(r"\1", k): v for k, v in state.items()}


# ------------------------------------------------------------------------------ conversion
def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _original_module_name(model: Flamingo, wrapper: nn.Module) -> str:
    """Name, in the unmodified LM (as OpenFlamingo's `lang_encoder` has it), of the module that
    our Decoupled* `wrapper` replaced: our wrapper sits where it was and keeps it as `.base`."""
    name = _module_name(model.lm, wrapper.base)
    if not name.endswith(".base"):
        raise ValueError(f"unexpected location {name!r} of the LM's original embedding")
    return name[: -len(".base")]


def _check_architecture(model: Flamingo) -> None:
    """Refuse configs that differ from OpenFlamingo in ways the weight shapes do not reveal."""
    config = model.config
    p, x = config.perceiver, config.cross_attention
    wrong = []
    for field, value, expected in [
        ("perceiver.heads", p.heads, _OF_HEADS), ("perceiver.head_dim", p.head_dim, _OF_HEAD_DIM),
        ("perceiver.ffw_mult", p.ffw_mult, _OF_FFW_MULT),
        ("cross_attention.heads", x.heads, _OF_HEADS), ("cross_attention.head_dim", x.head_dim, _OF_HEAD_DIM),
        ("cross_attention.ffw_mult", x.ffw_mult, _OF_FFW_MULT),
        ("activation", config.activation, "gelu"), ("bias", config.bias, False),
    ]:
        if value != expected:
            wrong.append(f"{field}={value!r} (OpenFlamingo: {expected!r})")
    if model.perceiver.input_proj is not None:
        wrong.append(f"perceiver.dim={p.dim!r} (OpenFlamingo: null, the vision feature width "
                     f"{model.perceiver.input_proj.in_features}; it has no input projection)")
    if wrong:
        raise CheckpointError("the config does not describe OpenFlamingo's architecture: " + "; ".join(wrong)
                              + "; build it with FlamingoConfig.openflamingo(...)")
    if x.media_attention != "previous" or x.skip_tokens_without_media:
        warnings.warn(f"cross_attention.media_attention={x.media_attention!r}, skip_tokens_without_media="
                      f"{x.skip_tokens_without_media}: OpenFlamingo uses 'previous' and False, so the converted "
                      f"model will not compute what OpenFlamingo computes", stacklevel=3)


def _describe_layers(indices: list[int]) -> str:
    if len(indices) >= 2:
        steps = {b - a for a, b in zip(indices, indices[1:])}
        if len(steps) == 1:
            every = steps.pop()
            hint = f"set cross_attention.every={every} and cross_attention.first_layer={indices[0]}"
            if indices[0] == every - 1:
                hint += f" (FlamingoConfig.openflamingo(..., cross_attn_every_n_layers={every}))"
            return hint
    if len(indices) == 1:
        return f"set cross_attention.first_layer={indices[0]} with cross_attention.every larger than the LM depth"
    return "set cross_attention.every/first_layer to match"


def convert_openflamingo_state_dict(
    of_state: dict[str, torch.Tensor],
    model: Flamingo,
    *,
    media_token_id: int | None = None,
    eoc_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Map an OpenFlamingo state dict onto `model.trainable_state_dict()` keys.

    Args:
        of_state: OpenFlamingo's `Flamingo.state_dict()` or its training checkpoint (the
            trainable subset), possibly wrapped as {"model_state_dict": ...} and/or with DDP's
            "module." prefix.
        model: our model, built with OpenFlamingo's architecture over the same LM.
        media_token_id / eoc_token_id: ids of `<image>` / `<|endofchunk|>` in the checkpoint's
            embedding table; default to this model's ids (OpenFlamingo adds the two tokens in the
            same order to the same base tokenizer).

    Returns the tensors to pass to `load_trainable_weights(model, ...)`. Frozen weights (the
    vision encoder, the LM's own) are ignored; any other key that cannot be mapped raises a
    `CheckpointError`, as does a checkpoint whose cross-attention layers sit before other LM
    blocks than the config puts them.
    """
    state = _unwrap(of_state)
    _check_architecture(model)
    expected = model.trainable_state_dict()
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}  # our key -> OpenFlamingo key, for messages
    unmappable: list[str] = []
    primary: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
    mirror: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
    decoder_paths: set[str] = set()

    try:
        input_name = _original_module_name(model, model.input_embeddings)
    except ValueError as err:
        raise CheckpointError(f"cannot locate the LM's input embedding in the model: {err}") from None
    input_key = f"lang_encoder.{input_name}.weight"

    def put(ours: str, of_key: str, tensor: torch.Tensor) -> None:
        out[ours] = tensor
        sources[ours] = of_key

    for key, tensor in state.items():
        if key.startswith("vision_encoder."):
            continue  # frozen
        if key.startswith("perceiver."):
            name = key[len("perceiver."):]
            if name == "media_time_embs":
                raise CheckpointError(
                    f"{key}: this checkpoint's Perceiver Resampler adds learned per-image-position embeddings "
                    f"(OpenFlamingo's max_num_media option, shape {tuple(tensor.shape)}), which this model does "
                    f"not have; it cannot be converted")
            ours = _apply_rules(_PERCEIVER_RULES, name)
            if ours is None:
                unmappable.append(key)
            else:
                put(f"perceiver.{ours}", key, tensor)
            continue
        if not key.startswith("lang_encoder."):
            unmappable.append(key)
            continue
        if key.startswith("lang_encoder.old_decoder_blocks."):
            continue  # frozen LM blocks, mirrored
        match = _XATTN_IN_DECODER.match(key)
        if match:
            decoder_paths.add(match["path"])
            primary[(int(match["idx"]), match["name"])] = (key, tensor)
            continue
        match = _XATTN_MIRROR.match(key)
        if match:
            mirror[(int(match["idx"]), match["name"])] = (key, tensor)
            continue
        if "gated_cross_attn" in key:
            unmappable.append(key)
        # Everything else under lang_encoder is the LM's own weights (frozen; the input
        # embedding is handled below).

    if len(decoder_paths) > 1:
        raise CheckpointError(f"OpenFlamingo checkpoint has gated cross-attention layers under several decoder "
                              f"paths: {sorted(decoder_paths)}")

    # Gated cross-attention: the per-block copies and the gated_cross_attn_layers mirror hold the
    # same tensors; either may be missing (OpenFlamingo's training script drops the mirror).
    xattn: dict[tuple[int, str], tuple[str, torch.Tensor]] = dict(mirror)
    for slot, (key, tensor) in primary.items():
        if slot in mirror and not torch.equal(mirror[slot][1], tensor):
            raise CheckpointError(f"OpenFlamingo checkpoint is inconsistent: {key} and its mirror "
                                  f"{mirror[slot][0]} hold different values")
        xattn[slot] = (key, tensor)
    ckpt_layers = sorted({idx for idx, _ in xattn})
    our_layers = sorted(model.cross_attn_layers)
    if ckpt_layers != our_layers:
        raise CheckpointError(
            f"checkpoint has cross-attention before blocks {ckpt_layers} but the config puts them before "
            f"{our_layers}; {_describe_layers(ckpt_layers)}")
    for (idx, name), (key, tensor) in sorted(xattn.items()):
        ours = _apply_rules(_XATTN_RULES, name)
        if ours is None:
            unmappable.append(key)
            continue
        if ours in ("attn_gate", "ffw_gate"):
            if tensor.numel() != 1:
                raise CheckpointError(f"{key}: expected a gate with one element, got shape {tuple(tensor.shape)}")
            tensor = tensor.reshape(())
        put(f"cross_attn.{idx}.{ours}", key, tensor)

    # Structure of the resampler first: its depth and temporal embeddings must agree with the config.
    p = model.config.perceiver
    depth = {int(m.group(1)) for k in state if (m := re.match(r"^perceiver\.layers\.(\d+)\.", k))}
    if depth and max(depth) + 1 != p.depth:
        raise CheckpointError(f"checkpoint's Perceiver Resampler has {max(depth) + 1} layers but the config has "
                              f"perceiver.depth={p.depth}; set perceiver.depth={max(depth) + 1}")
    frames = state.get("perceiver.frame_embs")
    if frames is None and p.max_frames > 0:
        raise CheckpointError(f"the config has perceiver.max_frames={p.max_frames} (temporal embeddings) but the "
                              f"checkpoint has no perceiver.frame_embs; set perceiver.max_frames=0")
    if frames is not None and frames.shape[0] != p.max_frames:
        raise CheckpointError(f"checkpoint has perceiver.frame_embs for {frames.shape[0]} frames but the config has "
                              f"perceiver.max_frames={p.max_frames}; set perceiver.max_frames={frames.shape[0]}")

    # Keys that map onto a name this model does not have (e.g. biases) are unmappable too.
    unmappable += [sources[k] for k in out if k not in expected]
    if unmappable:
        shown = ", ".join(sorted(unmappable)[:20]) + (f", ... ({len(unmappable)} in all)" if len(unmappable) > 20 else "")
        raise CheckpointError(f"OpenFlamingo checkpoint has trainable weights this model cannot take: {shown}")

    _convert_token_rows(state, model, out, input_key,
                        model.eoc_token_id if eoc_token_id is None else eoc_token_id,
                        model.media_token_id if media_token_id is None else media_token_id)

    missing = sorted(set(expected) - set(out))
    mis_shaped = [f"{sources.get(k, k)} -> {k}: expected {tuple(expected[k].shape)}, got {tuple(out[k].shape)}"
                  for k in sorted(out) if out[k].shape != expected[k].shape]
    if missing or mis_shaped:
        parts = []
        if missing:
            parts.append(f"no OpenFlamingo weights for {', '.join(missing[:20])}"
                         f"{f', ... ({len(missing)} in all)' if len(missing) > 20 else ''}")
        if mis_shaped:
            parts.append("shapes differ: " + "; ".join(mis_shaped[:20]))
        raise CheckpointError("OpenFlamingo checkpoint does not match the model (check the config's sizes and "
                              "the vision encoder's feature width): " + "; ".join(parts))
    return out


def _convert_token_rows(state: dict[str, torch.Tensor], model: Flamingo, out: dict[str, torch.Tensor],
                        input_key: str, eoc_id: int, media_id: int) -> None:
    """The trained rows of `<|endofchunk|>` and `<image>` -> our decoupled new rows."""
    embeddings = model.input_embeddings
    first, num_new = embeddings.first_new_id, embeddings.new_rows.shape[0]
    # Our new row k is the row of our id first + k; pair each with the checkpoint's id.
    pairs = [(model.eoc_token_id, eoc_id), (model.media_token_id, media_id)]
    if sorted(ours - first for ours, _ in pairs) != list(range(num_new)):
        raise CheckpointError(f"the model has {num_new} new token rows from id {first}, expected exactly "
                              f"<|endofchunk|> and <image>")

    table = state.get(input_key)
    if table is None:
        hints = sorted(k for k in state if k.startswith("lang_encoder.") and re.search(r"emb|wte|embed", k))
        raise CheckpointError(
            f"OpenFlamingo checkpoint has no input embedding table {input_key!r} (the LM's input embedding, "
            f"where OpenFlamingo trains the rows of <|endofchunk|> and <image>)"
            + (f"; embedding-like keys present: {hints}" if hints else "")
            + "; is it a checkpoint for this LM?")
    base = embeddings.base
    dim = base.weight.shape[1]
    if table.ndim != 2 or table.shape[1] != dim:
        raise CheckpointError(f"{input_key}: expected an embedding table of width {dim} (the LM's), "
                              f"got shape {tuple(table.shape)}")
    if max(eoc_id, media_id) >= table.shape[0] or min(eoc_id, media_id) < 0:
        raise CheckpointError(f"{input_key} has {table.shape[0]} rows, so it has no rows for ids "
                              f"<|endofchunk|>={eoc_id}, <image>={media_id}")
    raw = torch.empty(num_new, dim, dtype=torch.float32)
    for ours, theirs in pairs:
        raw[ours - first] = table[theirs].float()
    # Our new rows are table rows, embedded through the LM's own transform (e.g. Gemma's sqrt(d)
    # scale) exactly as OpenFlamingo's LM embeds the rows of its resized table.
    out["new_token_embeddings.new_rows"] = raw

    # OpenFlamingo trains the whole input table; we keep the LM's rows frozen, so say so if they moved.
    known = min(first, table.shape[0], base.weight.shape[0])
    theirs_rows = table[:known]
    ours_rows = base.weight.detach()[:known].to(theirs_rows.dtype)  # compare at the checkpoint's precision
    if not torch.equal(theirs_rows, ours_rows):
        diff = (theirs_rows.float() - ours_rows.float()).abs()
        warnings.warn(f"{input_key}: {int((diff.amax(1) > 0).sum())} of the {known} rows of the LM's own vocabulary "
                      f"differ from the LM's (max abs difference {float(diff.max()):.3g}); OpenFlamingo trained "
                      f"them (or the checkpoint is for another LM), but this model keeps the LM's rows frozen "
                      f"and takes only the <|endofchunk|> and <image> rows, so its outputs will differ",
                      stacklevel=3)

    if model.tied_new_rows:
        return
    head = model.output_head
    output_name = _original_module_name(model, head)
    output_key, bias_key = f"lang_encoder.{output_name}.weight", f"lang_encoder.{output_name}.bias"
    out_table = state.get(output_key)
    if out_table is None:
        warnings.warn(f"OpenFlamingo checkpoint has no output embedding {output_key!r} (OpenFlamingo does not train "
                      f"untied output rows, and its training script does not save them): the output rows of "
                      f"<|endofchunk|> and <image> keep this model's current values", stacklevel=3)
        out["new_token_logits.new_rows"] = head.new_rows.detach().clone()
        if head.new_bias is not None:
            out["new_token_logits.new_bias"] = head.new_bias.detach().clone()
        return
    if out_table.ndim != 2 or out_table.shape[1] != head.new_rows.shape[1] or \
            max(eoc_id, media_id) >= out_table.shape[0]:
        raise CheckpointError(f"{output_key}: expected an output embedding of width {head.new_rows.shape[1]} with rows "
                              f"for ids {eoc_id} and {media_id}, got shape {tuple(out_table.shape)}")
    out_rows = torch.empty(num_new, out_table.shape[1], dtype=torch.float32)
    for ours, theirs in pairs:
        out_rows[ours - first] = out_table[theirs].float()
    out["new_token_logits.new_rows"] = out_rows
    if head.new_bias is not None:
        if bias_key in state:
            bias = torch.empty(num_new, dtype=torch.float32)
            for ours, theirs in pairs:
                bias[ours - first] = state[bias_key][theirs].float()
            out["new_token_logits.new_bias"] = bias
        else:
            warnings.warn(f"OpenFlamingo checkpoint has no {bias_key!r}: the output biases of <|endofchunk|> and "
                          f"<image> keep this model's current values", stacklevel=3)
            out["new_token_logits.new_bias"] = head.new_bias.detach().clone()


# ---------------------------------------------------------------------------------- driver
def convert_openflamingo(checkpoint_path: str | Path, config: FlamingoConfig, out_dir: str | Path, *,
                         media_token_id: int | None = None, eoc_token_id: int | None = None,
                         overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Build our model from `config` (its backbones must be the checkpoint's, and its architecture
    OpenFlamingo's: see `FlamingoConfig.openflamingo`), load the converted OpenFlamingo weights
    strictly, and save it with `save_pretrained` into `out_dir` (returned). An existing `out_dir`
    is refused before any work unless `overwrite` (see `save_pretrained`)."""
    check_output_dir(out_dir, overwrite, "model directory", ours=(CONFIG_FILE, WEIGHTS_FILE))
    state = load_openflamingo_checkpoint(checkpoint_path)
    model = build_flamingo(config, trust_remote_code=trust_remote_code)
    tensors = convert_openflamingo_state_dict(state, model, media_token_id=media_token_id, eoc_token_id=eoc_token_id)
    load_trainable_weights(model, tensors, source=f"converted OpenFlamingo checkpoint {checkpoint_path}")
    return save_pretrained(model, out_dir, overwrite=overwrite)
