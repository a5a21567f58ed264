"""Reading a transformers checkpoint directory: its family and its tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flamingo.errors import CheckpointError

# config.json model_type -> the module that maps it
FAMILIES = {"mllama": "Llama 3.2 Vision (MllamaForConditionalGeneration)",
            "idefics": "IDEFICS (IdeficsForVisionText2Text)"}
INDEX_FILE = "model.safetensors.index.json"


def family_of(directory: str | Path) -> str | None:
    """The family (its config.json `model_type`) of a transformers checkpoint directory, None
    when `directory` holds no config.json. A model_type we do not map is refused, naming it."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a readable transformers config: {err}") from None
    if model_type not in FAMILIES:
        known = ", ".join(f"{k!r} ({v})" for k, v in FAMILIES.items())
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a model family this library maps "
                              f"(known: {known})")
    return model_type


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory: the shards its safetensors index names
    (each tensor in the shard the index says), or its one model.safetensors."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a readable safetensors index: {err}") from None
    elif (directory / "model.safetensors").is_file():
        weight_map = {}
    else:
        raise CheckpointError(f"{directory}: no {INDEX_FILE} and no model.safetensors (only safetensors "
                              f"checkpoints are read)")
    shards = sorted(set(weight_map.values())) or ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = directory / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is not a file in {directory}")
        try:
            with safe_open(str(path), framework="pt") as file:
                for key in file.keys():
                    if weight_map and weight_map.get(key) != shard:
                        raise CheckpointError(f"{path}: tensor {key!r} is not listed for this shard in {INDEX_FILE}")
                    tensors[key] = file.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    listed_elsewhere = sorted(set(weight_map) - set(tensors))
    if listed_elsewhere:
        raise CheckpointError(f"{index} lists tensors no shard holds: {', '.join(listed_elsewhere[:10])}")
    return tensors


def load_strictly(model: nn.Module, mapped: dict[str, torch.Tensor], source: str, family: str) -> None:
    """Load `mapped` (a checkpoint's tensors under our names) into `model` strictly: every tensor
    of the model is set and every tensor of the checkpoint is used, or a CheckpointError names
    the missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = sorted(f"{k}: expected {tuple(expected[k].shape)}, got {tuple(mapped[k].shape)}"
                    for k in set(expected) & set(mapped) if expected[k].shape != mapped[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{title}: {', '.join(items[:20])}" + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                 for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                      ("mis-shaped tensors", shapes)) if items]
        raise CheckpointError(f"{source} does not match the {family} model: " + "; ".join(parts))
    model.load_state_dict(mapped, strict=True)
