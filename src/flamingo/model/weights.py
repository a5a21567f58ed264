"""Saving and loading a Flamingo: the config plus the trained bridge, in safetensors.

The frozen backbones are not saved; they are rebuilt from the specs in the config. Loading is
strict and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from flamingo.errors import CheckpointError
from flamingo.model.card import CARD_FILE, is_hub_id, write_card
from flamingo.model.config import FlamingoConfig
from flamingo.model.embedded import ASSETS, EMBEDDED_MODEL, check_backbone_packages
from flamingo.model.families import converted_family, family_of, load_converted, load_family
from flamingo.model.flamingo import Flamingo
from flamingo.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, has_adapters, load_adapters, merge_lora
from flamingo.model.quantize import check_quantize_mode, quantize_model, quiet_torchao_import
from flamingo.model.tensor_files import load_weights_file, save_tensors
from flamingo.outputs import check_output_dir, publish, staging_dir

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "bridge.safetensors"
# Where a derived model came from (fine-tuning: its base; WiSE-FT: alpha and both endpoints).
PROVENANCE_FILE = "provenance.json"
# A language model saved inside a model directory (`flamingo merge-lora` writes the merged LM there).
MERGED_LM_DIR = "lm"


def write_model_files(folder: Path, tensors: dict[str, torch.Tensor], model_config: FlamingoConfig,
                      provenance: dict[str, Any] | None = None) -> None:
    """config.yaml + bridge.safetensors (+ provenance.json when given) and the model card README.md
    (flamingo.model.card) into an existing `folder` (a staging folder: see save_pretrained)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt", "flamingo_weights": "bridge-v1"})
    model_config.save(folder / CONFIG_FILE)
    if provenance is not None:
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
    write_card(folder, model_config, provenance)


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's trainable weights (names, dtypes, shapes, values): the identity of a
    base model in the provenance of the models derived from it, whatever file it was saved in."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    """The provenance record of a model directory, None when it has none (saved by
    save_pretrained, trained from scratch, or written before provenance was recorded)."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable provenance record: {err}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is not a provenance record (expected a JSON object)")
    return record


def save_pretrained(model: Flamingo, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write `config.yaml`, `bridge.safetensors` (trainable weights only) and the model card
    `README.md` (flamingo.model.card) as the folder `directory`.

    The folder is written next to its place and renamed into it, so it is never seen half written.
    An existing non-empty folder is refused, or replaced with `overwrite=True` when it is a saved
    model (it holds one of the two files)."""
    directory = check_output_dir(directory, overwrite, "model directory", ours=(CONFIG_FILE, WEIGHTS_FILE))
    with staging_dir(directory) as staged:
        write_model_files(staged, model.trainable_state_dict(), model.config)
        publish(staged, directory)
    return directory


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: such a model computes nothing meaningful (and
    training from it, or interpolating it, only spreads the damage)."""
    bad = [key for key, tensor in sorted(tensors.items())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise CheckpointError(f"{source} holds NaN or infinite weights (in {shown}): the model is damaged")


def load_trainable_weights(model: Flamingo, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                           backbone_defaults: bool = False) -> None:
    """Copy `tensors` into the model's trainable parameters; the key sets must match exactly,
    except that with `backbone_defaults` the unfrozen backbone parts (`config.unfreeze`) may be
    absent: they keep their pretrained values (a bridge-only model starting a fine-tuning run).
    Non-finite values are refused (`check_finite`)."""
    expected = model.trainable_state_dict()
    optional = model.unfrozen_backbone_names() if backbone_defaults else set()
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = sorted(f"{k}: expected {tuple(expected[k].shape)}, got {tuple(tensors[k].shape)}"
                        for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title} keys: {shown}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    check_finite(tensors, source)
    with torch.no_grad():
        for key, param in expected.items():
            if key in tensors:
                param.copy_(tensors[key].to(param.dtype))


def build_flamingo(config: FlamingoConfig, *, trust_remote_code: bool = False) -> Flamingo:
    """Build the backbones named by `config` (hub or local) and a freshly initialised bridge.
    A language model that needs its own code (`lm.trust_remote_code`) loads only with
    `trust_remote_code=True`."""
    from flamingo.model.language_model import load_language_model
    from flamingo.model.vision import build_vision_encoder

    quiet_torchao_import()  # transformers imports torchao, when installed, to load any LM
    lm, tokenizer = load_language_model(config.lm, trust_remote_code=trust_remote_code)
    if config.vision.kind == "features":  # fed precomputed features: no encoder
        return Flamingo(config, lm, tokenizer)
    return Flamingo(config, lm, tokenizer, vision_encoder=build_vision_encoder(config.vision))


def directory_config(directory: str | Path) -> FlamingoConfig:
    """The config.yaml of a model directory, a relative LM path naming a folder inside the directory
    (`flamingo merge-lora` writes the merged LM there) made absolute."""
    directory = Path(directory)
    config = FlamingoConfig.load(directory / CONFIG_FILE)
    for key in ("name_or_path", "tokenizer"):
        value = getattr(config.lm, key)
        if value and not Path(value).is_absolute() and (directory / value).is_dir():
            setattr(config.lm, key, str(directory.resolve() / value))
    return config


def load_pretrained(directory: str | Path, *, trust_remote_code: bool = False, merge_adapters: bool = True) -> Flamingo:
    """Rebuild a model saved with `save_pretrained` (see `build_flamingo` for `trust_remote_code`).
    LoRA adapters saved beside it (a LoRA training run's, flamingo.model.lora) are loaded and, with
    `merge_adapters`, folded into the layers they adapt (no extra work per token). See
    `directory_config` for the LM's path."""
    directory = Path(directory)
    if converted_family(directory):  # written by `flamingo convert`: its frozen backbones come with it
        config = directory_config(directory)
        model = load_converted(directory, unfreeze=config.unfreeze, source=config.lm.name_or_path)
    else:
        model = build_flamingo(directory_config(directory), trust_remote_code=trust_remote_code)
    load_trainable_weights(model, load_weights_file(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
    if has_adapters(directory):
        load_adapters(model, directory)
        if merge_adapters:
            merge_lora(model)
    return model


def load_embedded(progress: bool = True) -> Flamingo:
    """The embedded default (flamingo.model.embedded), offline. The first call converts the LM's
    GGUF file into a cached safetensors checkpoint (~20 s); later calls load it in seconds."""
    from tqdm.auto import tqdm

    check_backbone_packages()
    # One step: load_pretrained converts/verifies the LM cache itself (verifying hashes ~0.5 GB,
    # so it must not be done a second time here just to show a stage).
    with tqdm(total=1, desc="loading the embedded Flamingo (LM, vision encoder, bridge)", unit="model",
              disable=not progress) as bar:
        model = load_pretrained(ASSETS)
        bar.update()
    return model.eval()


def load_model(spec: str | Path | None = None, *, trust_remote_code: bool = False,
               quantize: str | None = None, revision: str | None = None) -> Flamingo:
    """A model from a saved directory, a config file (fresh bridge), a hub repository id
    holding a saved directory (`config.yaml` + `bridge.safetensors`), or "embedded"/None: the
    embedded default (offline, see flamingo.model.embedded). Code that comes with the language
    model runs only with `trust_remote_code=True`, whatever the config says. `quantize` ("int8",
    "int4") weight-only quantizes the frozen backbones' linear layers on the CPU, for inference
    (flamingo.model.quantize; needs the quantize extra). `revision` pins a hub id's branch, tag or
    commit (see `model_directory`)."""
    check_quantize_mode(quantize)
    if revision is not None and (spec is None or not is_hub_id(str(spec))):
        raise CheckpointError(f"revision {revision!r}: only a hub id (org/name) has revisions, not {spec!r}")
    if spec is None or str(spec) == EMBEDDED_MODEL:
        model = load_embedded()
    elif Path(spec).suffix in (".yaml", ".yml", ".json") and not Path(spec).is_dir():
        model = build_flamingo(FlamingoConfig.load(spec), trust_remote_code=trust_remote_code)
    elif Path(spec).is_dir() and not (Path(spec) / CONFIG_FILE).is_file() and family_of(spec):
        model = load_family(spec)  # a transformers checkpoint of a mapped family (config.json)
    else:
        model = load_pretrained(model_directory(spec, revision), trust_remote_code=trust_remote_code)
    if quantize is not None:
        quantize_model(model, quantize)
    return model


def model_directory(spec: str | Path, revision: str | None = None) -> Path:
    """The local saved model directory of `spec`: a directory, a hub id holding one (fetched at
    `revision`: a branch, tag or commit, default main; with HF_HUB_OFFLINE=1 read from the local
    Hub cache), or "embedded" (the embedded default's, inside this package)."""
    if str(spec) == EMBEDDED_MODEL:
        check_backbone_packages()  # its backbones are built from them next
        return ASSETS
    path = Path(spec)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is not a saved Flamingo model directory (no {CONFIG_FILE})")
        return path
    if path.exists() or str(spec).count("/") != 1:
        raise CheckpointError(f"model {spec!r}: expected a saved model directory, a config file or a hub id "
                              f"like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(spec), revision=revision,
                                      allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE, CARD_FILE,
                                                      ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, f"{MERGED_LM_DIR}/*"]))
    except Exception as err:  # offline, unknown repository, no access: one clear line
        raise CheckpointError(f"model {spec!r} could not be fetched from the hub: {type(err).__name__}: {err}") from None
