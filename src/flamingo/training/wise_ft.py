"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): the weight-space
ensemble theta = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned of a model and its
fine-tuned version, which keeps much of the zero-shot model's robustness at the fine-tuned
model's accuracy.

Every parameter that can differ between the two is interpolated: the bridge, and the backbone
parts either of them unfroze (`FlamingoConfig.unfreeze`); a part unfrozen in one model only has
its pretrained backbone value in the other. Everything else is the same frozen backbone in both.
The result is a normal model directory: the fine-tuned model's config (its resolution) with the
union of both unfrozen sets; alpha 0 and 1 give the two endpoints bit for bit (alpha 0: the
zero-shot model's config and tensors). LoRA adapters of the fine-tuned model (a LoRA fine-tune) are
interpolated too: their update is scaled by alpha. Its provenance.json records alpha and both endpoints (spec
and hash of their trainable weights). The zero-shot model must be the fine-tuned model's base, as
the fine-tuned model's provenance.json records it, unless `force`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from flamingo.config_io import short
from flamingo.errors import UserError
from flamingo.model.config import FlamingoConfig, UnfreezeConfig
from flamingo.model.families import converted_family, copy_family_files, load_converted
from flamingo.model.lora import copy_adapters, has_adapters
from flamingo.model.weights import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    build_flamingo,
    check_finite,
    directory_config,
    load_weights_file,
    read_provenance,
    weights_digest,
    write_model_files,
)
from flamingo.outputs import check_output_dir, publish, staging_dir

# Config fields that may differ: what is trained, and the input resolution (the same weights).
_FREE_FIELDS = ("unfreeze", "vision.image_size")


class WiseFTError(UserError):
    """The two models cannot be interpolated (different architectures or backbones)."""


def _flat(config: FlamingoConfig) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def interpolate(zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zero_shot + alpha * fine_tuned per tensor (computed in float32, stored in the
    fine-tuned dtype); alpha 0 / 1 return the endpoints exactly."""
    _check_alpha(alpha)
    out = {}
    for key, tuned in fine_tuned.items():
        if alpha == 0:
            out[key] = zero_shot[key].clone()
        elif alpha == 1:
            out[key] = tuned.clone()
        else:
            out[key] = torch.lerp(zero_shot[key].float(), tuned.float(), alpha).to(tuned.dtype)
    return out


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise WiseFTError(f"--alpha: expected a number in [0, 1], got {alpha!r}")


def wise_ft(zero_shot_dir: str | Path, fine_tuned_dir: str | Path, alpha: float, out_dir: str | Path, *,
            overwrite: bool = False, trust_remote_code: bool = False, force: bool = False,
            zero_shot_spec: str | None = None, fine_tuned_spec: str | None = None) -> Path:
    """Write the WiSE-FT model of two saved model directories as the folder `out_dir` (refused
    when it exists unless `overwrite`, or when it is, holds or lies inside either input; written
    whole or not at all; see `save_pretrained`); see the module docstring.

    The zero-shot model must be the fine-tuned model's base, as its provenance.json records it
    (the hash of the base's trainable weights); `force` interpolates models whose relation is
    unknown or different. The specs name the two models in the output's provenance (default:
    their directories)."""
    _check_alpha(alpha)
    zero_shot_dir, fine_tuned_dir = Path(zero_shot_dir), Path(fine_tuned_dir)
    if has_adapters(zero_shot_dir):
        raise WiseFTError(f"{zero_shot_dir} holds LoRA adapters: fold them into a plain model directory first "
                          f"(flamingo merge-lora) and interpolate from that")
    _check_out_apart(Path(out_dir), {"zero-shot": zero_shot_dir, "fine-tuned": fine_tuned_dir})
    out_dir = check_output_dir(out_dir, overwrite, "model directory", ours=(CONFIG_FILE, WEIGHTS_FILE))
    zs_config, ft_config = directory_config(zero_shot_dir), directory_config(fine_tuned_dir)
    # The architecture and backbones must be the same: checked before any backbone is built
    # (which may download a language model).
    zs_fields, ft_fields = _flat(zs_config), _flat(ft_config)
    for key in ft_fields:
        if not key.startswith(_FREE_FIELDS) and zs_fields.get(key) != ft_fields[key]:
            raise WiseFTError(f"{zero_shot_dir} and {fine_tuned_dir} are not the same model: config field {key} is "
                              f"{zs_fields.get(key)!r} vs {ft_fields[key]!r}")
    saved = [load_weights_file(directory / WEIGHTS_FILE) for directory in (zero_shot_dir, fine_tuned_dir)]
    for directory, tensors in zip((zero_shot_dir, fine_tuned_dir), saved):
        check_finite(tensors, str(directory / WEIGHTS_FILE))
    digests = [weights_digest(tensors) for tensors in saved]
    if not force:
        _check_base(zero_shot_dir, fine_tuned_dir, digests[0])
    union = copy.deepcopy(ft_config)
    union.unfreeze = UnfreezeConfig(zs_config.unfreeze.vision or ft_config.unfreeze.vision,
                                    sorted(set(zs_config.unfreeze.lm_blocks) | set(ft_config.unfreeze.lm_blocks)))
    # The pretrained backbones: the value of a part that the other model kept frozen (a converted
    # family model's come with it, and go with the output: flamingo.model.families).
    family_base = zero_shot_dir if converted_family(zero_shot_dir) else None
    if family_base is not None:
        model = load_converted(family_base, unfreeze=union.unfreeze, source=union.lm.name_or_path)
    else:
        model = build_flamingo(union, trust_remote_code=trust_remote_code)
    pretrained = {k: v.detach() for k, v in model.trainable_state_dict().items()}
    backbone = model.unfrozen_backbone_names()
    endpoints = [_endpoint(directory, tensors, pretrained, backbone)
                 for directory, tensors in zip((zero_shot_dir, fine_tuned_dir), saved)]
    mixed = interpolate(endpoints[0], endpoints[1], alpha)
    check_finite(mixed, f"the WiSE-FT model at alpha {alpha:g}")  # e.g. a low-precision overflow
    config = union
    if alpha == 0:  # the zero-shot model itself: its config (resolution, unfrozen parts) and tensors
        config, mixed = zs_config, {key: mixed[key] for key in saved[0]}
    specs = (zero_shot_spec or str(zero_shot_dir), fine_tuned_spec or str(fine_tuned_dir))
    zero_shot = {"spec": specs[0], "weights_sha256": digests[0]}
    provenance = {"base": zero_shot,
                  "wise_ft": {"alpha": alpha, "zero_shot": zero_shot,
                              "fine_tuned": {"spec": specs[1], "weights_sha256": digests[1],
                                             "base": (read_provenance(fine_tuned_dir) or {}).get("base")},
                              "forced": force}}
    with staging_dir(out_dir) as staged:
        write_model_files(staged, mixed, config, provenance)
        if has_adapters(fine_tuned_dir) and alpha > 0:  # the adapted layers' weights, interpolated
            copy_adapters(fine_tuned_dir, staged, scale=alpha)
        if family_base is not None:
            copy_family_files(family_base, staged)
        publish(staged, out_dir)
    return out_dir


def _check_out_apart(out_dir: Path, inputs: dict[str, Path]) -> None:
    """Writing the output must not replace or change an input (even with --overwrite)."""
    out = out_dir.resolve()
    for name, directory in inputs.items():
        there = directory.resolve()
        if out == there or out.is_relative_to(there) or there.is_relative_to(out):
            raise WiseFTError(f"--out {out_dir}: the {name} model {directory} is read from there; write the "
                              f"WiSE-FT model to a folder apart from both models")


def _check_base(zero_shot_dir: Path, fine_tuned_dir: Path, zero_shot_digest: str) -> None:
    """Refuse a zero-shot model that is not the base the fine-tuned model was trained from."""
    base = (read_provenance(fine_tuned_dir) or {}).get("base")
    if not isinstance(base, dict) or not isinstance(base.get("weights_sha256"), str):
        raise WiseFTError(f"{fine_tuned_dir} does not record the base model it was fine-tuned from (no base in "
                          f"a {PROVENANCE_FILE}, as `flamingo finetune` writes); pass --force (force=True) to "
                          f"interpolate it with {zero_shot_dir} anyway")
    if base["weights_sha256"] != zero_shot_digest:
        raise WiseFTError(f"{zero_shot_dir} is not the base model of {fine_tuned_dir}: its weights differ from "
                          f"those it was fine-tuned from ({short(base.get('spec'))}, sha256 "
                          f"{base['weights_sha256'][:12]}); pass --force (force=True) to interpolate them anyway")


def _endpoint(directory: Path, tensors: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor],
              backbone: set[str]) -> dict[str, torch.Tensor]:
    """A model's value of every interpolated tensor: its saved weights (`tensors`), and the
    pretrained value of the backbone parts it did not train."""
    for key in sorted(set(tensors) | set(pretrained)):
        here = tuple(tensors[key].shape) if key in tensors else None
        there = tuple(pretrained[key].shape) if key in pretrained else None
        if here != there and not (here is None and key in backbone):
            raise WiseFTError(f"{directory / WEIGHTS_FILE} does not match the other model: first differing tensor "
                              f"{key} (shape {here or 'absent'} here, {there or 'absent'} in the other)")
    return {key: tensors.get(key, value) for key, value in pretrained.items()}
