"""Other members of the Flamingo family, expressed as configuration of `flamingo.model.flamingo.Flamingo`
(see each module's mapping table), loaded from the directories transformers' `save_pretrained`
writes (config.json, sharded safetensors, tokenizer and processor files).

`family_of(directory)` names the family of such a directory from its config.json `model_type`;
`load_family(directory)` builds our model from it, loading every tensor strictly.
"""

from __future__ import annotations

from pathlib import Path

from flamingo.errors import CheckpointError
from flamingo.model.families import idefics, mllama
from flamingo.model.families.checkpoint import FAMILIES, family_of
from flamingo.model.flamingo import Flamingo

__all__ = ["FAMILIES", "family_of", "load_family", "shapes_only"]


# config.json model_type -> (the module that maps it, its transformers config class)
_MODULES = {"mllama": (mllama, "MllamaConfig"), "idefics": (idefics, "IdeficsConfig")}


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
