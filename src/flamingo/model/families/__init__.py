"""Other members of the Flamingo family, expressed as configuration of `flamingo.model.flamingo.Flamingo`
(see each module's mapping table), loaded from the directories transformers' `save_pretrained`
writes (config.json, sharded safetensors, tokenizer and processor files).

`family_of(directory)` names the family of such a directory from its config.json `model_type`;
`load_family(directory)` builds our model from it, loading every tensor strictly. `flamingo convert`
(`flamingo.model.families.convert`) writes our model directory from it once: config.yaml and
bridge.safetensors as every model directory, beside them `family/` (the family's config.json,
tokenizer and processor files, and `frozen.safetensors`: the frozen backbones' tensors in our
names); `load_converted` reads that back (`load_model` does).

How the generic code runs such a model (`flamingo.inference`, `flamingo.serving`): it asks the
model's `MediaFamily` (`media_family(model)`; None for our own models, which the inference
package's default implements) the few things in which a family differs; everything else (the
explicit `FlamingoState`, greedy/sampling/beam decoding, few-shot context reuse, scoring, the
serving engine with its prefix cache) is shared. A family module implements the interface as
its module-level `MEDIA_FAMILY` (`mllama.MEDIA_FAMILY`); its `build_model` sets `model.family` to
its name (the config.json `model_type`).

The interface (`interface.MediaFamily`; its data: `EncodedMedia`, `ChatMessage`, `MEDIA`):

- `tokenize(model, text, add_special_tokens)`: prompt text with media tokens -> the ids the
  family's processor builds (Llama 3.2 Vision: BOS after any leading images);
- `preprocess(model, frames)`: one image -> its pixels as `encode` takes them (decoded once);
- `encode(model, media)`: per prompt its preprocessed media -> `EncodedMedia` (visual tokens
  [B, N, R, D], media counts, and the key mask of padding tiles where the family has one);
- `chat_text(model, messages)`: a chat in the family's own format (its chat template), ready for
  the answer; `chat_stop_strings`: what a chat stops at besides the end-of-turn token.

What the generic code derives from the configuration, not from the family: a token with no image
before it sees every visual token of its prompt where `zero_attention_without_media` is off
(Llama 3.2 Vision), so such text cannot be batched with padding media slots nor cached as a
prefix of other prompts; consecutive images form one group where `media_attention` is "group",
so a prefix is never cut between them, and a continued state carries the group of its last token
(`FlamingoState.group_first`); under `no_media_after_eos` (IDEFICS's packed documents) a continued
state carries the image its next token sees, none after an end-of-sequence token
(`FlamingoState.media_seen`), so a few-shot context ending with `</s>` is continued exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flamingo.errors import CheckpointError, UserError
from flamingo.model.config import UnfreezeConfig
from flamingo.model.families import idefics, mllama
from flamingo.model.families.checkpoint import FAMILIES, family_of
from flamingo.model.families.interface import MEDIA, ChatMessage, EncodedMedia, MediaFamily
from flamingo.model.flamingo import Flamingo

__all__ = ["CONVERTED_DIR", "FAMILIES", "FROZEN_FILE", "MEDIA", "ChatMessage", "EncodedMedia", "MediaFamily",
           "converted_family", "copy_family_files", "family_of", "frozen_state_dict", "load_converted", "load_family",
           "media_family", "shapes_only", "training_media"]


# config.json model_type -> (the module that maps it, its transformers config class)
_MODULES = {"mllama": (mllama, "MllamaConfig"), "idefics": (idefics, "IdeficsConfig")}


def media_family(model: Flamingo) -> MediaFamily | None:
    """The interface of the model's family (`model.family`), None for our own models (the default
    path). A family whose module has no `MEDIA_FAMILY` yet is refused, naming it."""
    name = getattr(model, "family", None)
    if name is None:
        return None
    interface = getattr(_MODULES[name][0], "MEDIA_FAMILY", None) if name in _MODULES else None
    if interface is None:
        raise UserError(f"{FAMILIES.get(name, name)}: this family does not run through the generic inference and "
                        f"serving code yet (its module has no MEDIA_FAMILY)")
    return interface


def training_media(model: Flamingo, items: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training sample's media as its family's `preprocess` gave them, in order -> the pixels
    [N, T, 3, H, W] and the per-image inputs [N, ...] that `Flamingo.forward` takes beside them
    (`vision_inputs`; Llama 3.2 Vision: T tiles, aspect_ratio_ids, aspect_ratio_mask)."""
    return _MODULES[model.family][0].stack_media(items)


CONVERTED_DIR = "family"  # inside a converted model directory: the family's files
FROZEN_FILE = "frozen.safetensors"  # in CONVERTED_DIR: every tensor of the model but the bridge's


def converted_family(directory: str | Path) -> str | None:
    """The family of a model directory written by `flamingo convert`, None for any other."""
    return family_of(Path(directory) / CONVERTED_DIR) if (Path(directory) / CONVERTED_DIR).is_dir() else None


def frozen_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict but the bridge's (the trainable parameters other than
    the backbone parts `unfreeze` names): the backbones, as `frozen.safetensors` holds them."""
    unfrozen = {id(param) for module in model.unfrozen_backbone.values() for param in module.parameters()}
    bridge = {name for name, param in model.named_parameters() if param.requires_grad and id(param) not in unfrozen}
    return {name: tensor for name, tensor in model.state_dict().items() if name not in bridge}


def copy_family_files(directory: str | Path, out: str | Path) -> None:
    """The `family/` folder of the converted model directory `directory` into the model directory
    `out` (a fine-tuned model of it: its frozen backbones are the base's), each file hard-linked
    where the file system allows, else copied."""
    import os
    import shutil

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(Path(directory) / CONVERTED_DIR, Path(out) / CONVERTED_DIR, copy_function=link_or_copy)


def load_converted(directory: str | Path, unfreeze: UnfreezeConfig | None = None, source: str | None = None
                   ) -> Flamingo:
    """A converted model directory's model with its frozen tensors loaded strictly (the caller loads
    the trainable ones: bridge.safetensors, as for every model directory). From its config.yaml:
    unfreeze, the backbone parts trained with the bridge (a fine-tuned model's: they start from the
    frozen tensors, which the caller's bridge.safetensors then replaces), and source, the checkpoint
    it was converted from (the backbones' `name_or_path`; default: `directory`)."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = Path(directory) / CONVERTED_DIR
    module, config_class = _MODULES[family_of(folder)]
    try:
        hf_config = getattr(transformers, config_class).from_pretrained(str(folder))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:300]
        raise CheckpointError(f"{folder}: cannot read its config or tokenizer: {reason}") from None
    model = module.build_model(hf_config, tokenizer, source=source or str(directory), unfreeze=unfreeze)
    try:
        frozen = load_file(str(folder / FROZEN_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / FROZEN_FILE} is not a readable safetensors file: {err}") from None
    expected = set(frozen_state_dict(model))
    missing, unexpected = sorted(expected - set(frozen)), sorted(set(frozen) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder / FROZEN_FILE} does not match the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    model.load_state_dict(frozen, strict=False)
    model.processor = module.read_processor(folder)
    return model.eval()


def load_family(directory: str | Path) -> Flamingo:
    """Our model of the transformers checkpoint in `directory` (see `family_of`), in eval mode."""
    family = family_of(directory)
    if family is None:
        raise CheckpointError(f"{directory} holds no config.json: not a transformers checkpoint")
    return _MODULES[family][0].load_checkpoint(directory)


def shapes_only(directory: str | Path) -> Flamingo:
    """Our model of the checkpoint in `directory` from its config.json alone, on the meta device
    (no weights read or allocated): `flamingo params` on a published config."""
    import transformers

    family = family_of(directory)
    if family is None:
        raise CheckpointError(f"{directory} holds no config.json: not a transformers checkpoint")
    module, config_class = _MODULES[family]
    try:
        hf_config = getattr(transformers, config_class).from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{directory}/config.json: {str(err).splitlines()[0][:300]}") from None
    return module.build_shapes_only(hf_config)
