"""`flamingo convert DIR OUT`: our model directory written once from a family's transformers
checkpoint (see `flamingo.model.families`): config.yaml and bridge.safetensors (the trainable
tensors) as `save_pretrained` writes them, and beside them `family/` with the family's config.json,
tokenizer and processor files and `frozen.safetensors` (every other tensor, in our names).
`load_model(OUT)` reads it back (`load_converted`), computing exactly what the checkpoint does."""

from __future__ import annotations

from pathlib import Path

from flamingo.errors import CheckpointError
from flamingo.model.families import (
    _MODULES,
    CONVERTED_DIR,
    FROZEN_FILE,
    family_of,
    frozen_state_dict,
    load_family,
)
from flamingo.model.weights import save_pretrained, save_tensors


def convert_family(directory: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the converted model directory `out` from the family checkpoint `directory`."""
    family = family_of(directory)
    if family is None:
        raise CheckpointError(f"{directory} holds no config.json: not a transformers checkpoint")
    if not hasattr(_MODULES[family][0], "read_processor"):
        raise CheckpointError(f"{directory}: flamingo convert does not write the {family!r} family yet")
    model = load_family(directory)
    frozen = {name: tensor.detach().contiguous() for name, tensor in frozen_state_dict(model).items()}
    out = save_pretrained(model, out, overwrite=overwrite)
    folder = out / CONVERTED_DIR
    folder.mkdir()
    model.tokenizer.save_pretrained(folder)
    if getattr(model, "processor", None) is not None:
        model.processor.save_pretrained(folder)
    (folder / "config.json").write_text((Path(directory) / "config.json").read_text(encoding="utf-8"),
                                        encoding="utf-8")
    save_tensors(frozen, folder / FROZEN_FILE, metadata={"format": "pt"})
    return out
