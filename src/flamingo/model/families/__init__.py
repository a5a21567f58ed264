"""Other members of the Flamingo family, expressed as configuration of `flamingo.model.flamingo.Flamingo`
(see each module's mapping table), loaded from the directories transformers' `save_pretrained`
writes (config.json, sharded safetensors, tokenizer and processor files).

`family_of(directory)` names the family of such a directory from its config.json `model_type`;
`load_family(directory)` builds our model from it, loading every tensor strictly.
"""

from __future__ import annotations

from pathlib import Path

from flamingo.errors import CheckpointError
from flamingo.model.families import mllama
from flamingo.model.families.checkpoint import FAMILIES, family_of
from flamingo.model.flamingo import Flamingo

__all__ = ["FAMILIES", "family_of", "load_family", "shapes_only"]


def load_family(directory: str | Path) -> Flamingo:
    """Our model of the transformers checkpoint in `directory` (see `family_of`), in eval mode."""
    family = family_of(directory)
    if family is None:
        raise CheckpointError(f"{directory} holds no config.json: not a transformers checkpoint")
    return mllama.load_checkpoint(directory)


def shapes_only(directory: str | Path) -> Flamingo:
    """Our model of the checkpoint in `directory` from its config.json alone, on the meta device
    (no weights read or allocated): `flamingo params` on a published config."""
    from transformers import MllamaConfig

    if family_of(directory) is None:
        raise CheckpointError(f"{directory} holds no config.json: not a transformers checkpoint")
    try:
        hf_config = MllamaConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}/config.json: {str(err).splitlines()[0][:300]}") from None
    return mllama.build_shapes_only(hf_config)
