"""`flamingo merge-lora DIR OUT`: a model directory's LoRA adapters folded into a plain model directory.

The adapters on cross-attention layers fold into the bridge (OUT/bridge.safetensors). Those on the
frozen LM change the LM's own weights, which a model directory otherwise does not hold (they are
rebuilt from `lm.name_or_path`): the merged LM is saved with its tokenizer by transformers as
OUT/lm, and OUT's config points there (`load_pretrained` reads a relative LM path inside the
directory from it). OUT then loads anywhere a model directory does, PEFT not needed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from flamingo.model.language_model import FlamingoDecoderLayer, load_language_model
from flamingo.model.lora import LoraError, has_adapters, merge_lora
from flamingo.model.weights import (
    CONFIG_FILE,
    MERGED_LM_DIR,
    WEIGHTS_FILE,
    load_pretrained,
    model_directory,
    write_model_files,
)
from flamingo.outputs import check_output_dir, publish, staging_dir


def plain_lm_names(lm: nn.Module) -> dict[int, str]:
    """id(module) -> its name in the language model as loaded, before our decoder-layer wrappers
    (FlamingoDecoderLayer) took the places of the layers they wrap; our cross-attention blocks are
    not the LM's and have none."""
    names: dict[int, str] = {}

    def walk(module: nn.Module, name: str) -> None:
        names[id(module)] = name
        if isinstance(module, FlamingoDecoderLayer):
            walk(module.decoder_layer, name)  # the wrapper stands where the layer stood
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(lm, "")
    return names


def merge_lora_directory(source: str | Path, out: str | Path, *, overwrite: bool = False,
                         trust_remote_code: bool = False) -> Path:
    """Write OUT: the model `source` names (a directory with adapters, or a hub id holding one) with
    its adapters merged (see the module docstring); returns OUT."""
    source = model_directory(source)
    if not has_adapters(source):
        raise LoraError(f"{source} holds no LoRA adapters (no adapter_config.json): there is nothing to merge")
    out = check_output_dir(out, overwrite, "model directory", ours=(CONFIG_FILE, WEIGHTS_FILE))
    model = load_pretrained(source, trust_remote_code=trust_remote_code, merge_adapters=False)
    merged = [model.lm.get_submodule(name) for name in merge_lora(model)]
    plain = plain_lm_names(model.lm)
    lm_layers = {plain[id(layer)]: layer for layer in merged if id(layer) in plain}
    config = copy.deepcopy(model.config)
    with staging_dir(out) as staged:
        if lm_layers:
            lm, tokenizer = load_language_model(config.lm, trust_remote_code=trust_remote_code)
            with torch.no_grad():
                for name, layer in lm_layers.items():
                    lm.get_submodule(name).weight.copy_(layer.weight)
            lm.save_pretrained(staged / MERGED_LM_DIR)
            tokenizer.save_pretrained(staged / MERGED_LM_DIR)
            config.lm.name_or_path, config.lm.revision = MERGED_LM_DIR, None
            config.lm.gguf_file = config.lm.tokenizer = None
        write_model_files(staged, model.trainable_state_dict(), config)
        publish(staged, out)
    return out
