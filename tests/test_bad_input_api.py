"""Bad-input corpus, Python API: every case must raise the library's user-error type (a
`flamingo.errors.UserError`) with a short message naming the field, option or file, and leave no
file changed outside the output folder. See tests/bad_input.py for the contract."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import expect_user_error

from flamingo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ configs built in code
MODEL_FIELDS = [
    ("vision", "kind", "resnet"), ("vision", "kind", 5), ("vision", "name_or_path", 5), ("vision", "image_size", "big"),
    ("vision", "mean", (1, 2)), ("vision", "std", "0.5"), ("vision", "pretrained", "yes"), ("vision", "colour_bins", 9),
    ("vision", "colour_bins", 2.5), ("lm", "name_or_path", 5), ("lm", "name_or_path", ["a"]), ("lm", "revision", 3),
    ("lm", "dtype", "int4"), ("lm", "trust_remote_code", "true"), ("lm", "gguf_file", 1), ("perceiver", "depth", 0),
    ("perceiver", "depth", True), ("perceiver", "num_latents", "64"), ("perceiver", "heads", -1),
    ("perceiver", "max_frames", -1), ("perceiver", "dim", 0), ("cross_attention", "every", 0),
    ("cross_attention", "first_layer", -1), ("cross_attention", "media_attention", "future"),
    ("cross_attention", "skip_tokens_without_media", 1), ("cross_attention", "head_dim", None),
    ("", "activation", "relu"), ("", "bias", "no"), ("", "media_token", 5), ("", "media_token", ""),
    ("", "end_of_chunk_token", None),
]


@pytest.mark.parametrize("section, field, value", MODEL_FIELDS, ids=lambda v: str(v)[:20])
def test_model_config_fields_are_type_checked(section, field, value):
    from flamingo.model.config import ConfigError, FlamingoConfig

    data = {section: {field: value}} if section else {field: value}
    expect_user_error(lambda: FlamingoConfig.from_dict(data), expect=f"{section + '.' if section else ''}{field}",
                      exc=ConfigError)

    def in_code():
        config = FlamingoConfig()
        setattr(getattr(config, section) if section else config, field, value)
        config.validate()

    expect_user_error(in_code, expect=field, exc=ConfigError)


GENERATION_FIELDS = [
    ("max_new_tokens", 0), ("max_new_tokens", 10**9), ("max_new_tokens", 2.5), ("max_new_tokens", "5"),
    ("num_beams", 0), ("num_beams", 10**6), ("num_beams", True), ("length_penalty", math.nan),
    ("length_penalty", "x"), ("do_sample", "yes"), ("temperature", 0), ("temperature", -1.0),
    ("temperature", math.inf), ("temperature", math.nan), ("top_k", -1), ("top_k", 1.5), ("top_p", 0),
    ("top_p", 1.01), ("top_p", math.nan), ("seed", -1), ("seed", 2**80), ("seed", "x"), ("stop_strings", [""]),
    ("stop_strings", [3]), ("stop_strings", "stop"), ("stop_at_end_of_chunk", None),
]


@pytest.mark.parametrize("field, value", GENERATION_FIELDS, ids=lambda v: str(v)[:20])
def test_generation_config_fields(field, value):
    from flamingo.inference.generation import GenerationConfig, GenerationConfigError

    expect_user_error(lambda: GenerationConfig(**{field: value}), expect=field, exc=GenerationConfigError)


DATASET_FIELDS = [
    ("name", ""), ("name", 5), ("kind", "audio"), ("path", []), ("path", 5), ("path", [""]), ("weight", -1),
    ("weight", "x"), ("batch_size", 0), ("batch_size", "8"), ("max_tokens", 3), ("max_images", 0),
    ("min_images", 99), ("p_next", 1.5), ("p_space", -0.1), ("fps", 0), ("frames", 0), ("frame_folder_fps", -1),
    ("augment", "yes"), ("flip_prob", 2), ("color_jitter", 1), ("filter_images", 0), ("min_image_side", 0),
    ("max_aspect_ratio", 0.5), ("single_colour_tolerance", 255), ("text_separator", 1), ("add_bos", None),
    ("shuffle", "no"), ("shuffle_buffer", -1), ("epochs", 0), ("drop_last", 1), ("num_workers", -1),
    ("max_pixels", 0), ("colour", "red"),
]


@pytest.mark.parametrize("field, value", DATASET_FIELDS, ids=lambda v: str(v)[:20])
def test_dataset_config_fields(field, value):
    from flamingo.data.config import DataError, DatasetConfig

    entry = {"name": "d", "kind": "pairs", "path": "x", field: value}
    expect_user_error(lambda: DatasetConfig.from_dict(entry), expect=field, exc=DataError)


EVAL_FIELDS = [
    ("shots", []), ("shots", [-1]), ("shots", [4, 4]), ("shots", "4"), ("trials", 0), ("ensemble_size", 0),
    ("support_size", 0), ("batch_size", 0), ("batch_size", 10**9), ("num_beams", 0), ("video_frames", 0),
    ("query_size", 0), ("max_new_tokens", 0), ("split", "train"), ("demo_mode", "each"), ("video_fps", 0),
    ("video_fps", math.inf), ("seed", -1), ("rices", "yes"), ("length_penalty", "x"),
]


@pytest.mark.parametrize("field, value", EVAL_FIELDS, ids=lambda v: str(v)[:20])
def test_eval_settings_fields(field, value):
    from flamingo.evaluation import EvalDataError, EvalSettings

    expect_user_error(lambda: EvalSettings(**{field: value}).validate(), expect=field, exc=EvalDataError)


# ------------------------------------------------------------------- structured text files
@pytest.mark.parametrize("text, json_format, message", [
    ("a: [1, 2\n", False, "x.yaml:2:1: invalid YAML"),
    ("a: b: c\n", False, "x.yaml:1:5: invalid YAML"),
    ("{\"a\": }", True, "x.yaml:1:7: invalid JSON"),
    ("[" * 70 + "]" * 70, True, "nested deeper than 64"),
    ("a: " + "[" * 70 + "]" * 70, False, "nested deeper than 64"),
    ("".join("  " * i + "a:\n" for i in range(80)), False, "nested deeper than 64"),
    ("a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
     False, "aliases are expanded"),
    ("a: !!python/name:os.system\n", False, "invalid YAML"),
], ids=["unclosed", "colon", "json", "json-deep", "flow-deep", "block-deep", "alias-bomb", "python-tag"])
def test_structured_text_errors(text, json_format, message):
    from flamingo.config_io import parse_structured

    expect_user_error(lambda: parse_structured(text, "x.yaml", json_format=json_format), expect=message)


def test_echoed_values_are_bounded():
    from flamingo.model.config import FlamingoConfig

    huge = "x" * 1_000_000
    err = expect_user_error(lambda: FlamingoConfig.from_dict({"lm": {"name_or_path": [huge] * 1000}}),
                            expect="lm.name_or_path")
    assert len(str(err)) < 300


def test_write_text_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import os

    from flamingo.outputs import write_text_atomic

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    expect_user_error(lambda: write_text_atomic(tmp_path / "out.json", "{}"),
                      expect=["out.json", "No space left on device"], watch=[tmp_path])


# ------------------------------------------------------------------------------ prompts, images
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("api-images")
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    (folder / "truncated.png").write_bytes((folder / "red.png").read_bytes()[:50])
    (folder / "folder.png").mkdir()
    return folder


@pytest.mark.parametrize("items, message", [
    (["text", 5], "int"),
    (["text", None], "NoneType"),
    (["text", "red.png"], None),  # a str is text: fine, nothing to refuse
    ([Path("nowhere.png")], "nowhere.png"),
    ([Path("empty.png")], "empty.png"),
    ([Path("text.png")], "text.png"),
    ([Path("truncated.png")], "truncated.png"),
    ([Path("folder.png")], "folder.png"),
    (["a <image> in text"], "<image>"),
    (["bad \udcff bytes"], "not valid UTF-8"),
    ([[]], "list"),
    ([{"image": "x"}], "dict"),
], ids=lambda v: str(v)[:24])
def test_interleaved_prompt_items(image_files, items, message):
    from flamingo.inference.prompt import PromptError, interleaved_prompt

    resolved = [image_files / i if isinstance(i, Path) else i for i in items]
    if message is None:
        interleaved_prompt(resolved)
        return
    # a bad image file is an ImageProcessingError, a bad item a PromptError: both UserErrors
    expect_user_error(lambda: interleaved_prompt(resolved), expect=message, watch=[image_files],
                      exc=UserError if isinstance(items[0], Path) else PromptError)


@pytest.mark.parametrize("text, images, message", [
    ("<image><image>", ["red.png"], "2 <image> placeholder"),
    ("no image", ["red.png"], "0 <image> placeholder"),
    ("<image>", [], "1 <image> placeholder"),
    ("<image>\udcff", ["red.png"], "prompt: not valid UTF-8"),
    (5, [], "prompt: expected text"),
])
def test_text_prompt(image_files, text, images, message):
    from flamingo.inference.prompt import PromptError, text_prompt

    paths = [image_files / i for i in images]
    expect_user_error(lambda: text_prompt(text, paths), expect=message, exc=PromptError)


@pytest.mark.parametrize("name, kwargs, message", [
    ("empty.png", {}, "empty.png"), ("text.png", {}, "text.png"), ("truncated.png", {}, "truncated.png"),
    ("folder.png", {}, "folder.png"), ("missing.png", {}, "missing.png"), ("red.png", {"max_pixels": 10}, "1200"),
])
def test_load_image(image_files, name, kwargs, message):
    from flamingo.model.image_processing import load_image

    expect_user_error(lambda: load_image(image_files / name, **kwargs), expect=message, watch=[image_files])


# ----------------------------------------------------------------- saved models, checkpoints
@pytest.fixture(scope="module")
def saved_model(lm_dir, tmp_path_factory):
    from conftest import build_tiny

    from flamingo.model.weights import save_pretrained

    return save_pretrained(build_tiny(lm_dir("llama")), tmp_path_factory.mktemp("api-saved") / "model")


@pytest.mark.parametrize("spec, message", [
    ("nowhere/model", "nowhere/model"), ("empty", "not a saved Flamingo model directory"),
    ("file.txt", "file.txt"), ("bad.yaml", "bad.yaml"),
])
def test_load_model_specs(tmp_path, monkeypatch, spec, message):
    from flamingo.model.weights import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bad.yaml").write_text("perceiver: {depth: zero}\n")
    expect_user_error(lambda: load_model(spec), expect=message, watch=[tmp_path])


def test_save_pretrained_on_a_full_disk(saved_model, lm_dir, tmp_path, monkeypatch):
    from conftest import build_tiny

    import flamingo.model.weights as weights

    model = build_tiny(lm_dir("llama"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("flamingo.model.tensor_files.save_file", full)
    expect_user_error(lambda: weights.save_pretrained(model, tmp_path / "out"),
                      expect=["out", "No space left on device"], watch=[tmp_path], allowed=[tmp_path / "out"])
    assert not (tmp_path / "out" / "bridge.safetensors").exists()
    assert not (tmp_path / "out" / "bridge.safetensors.tmp").exists()


@pytest.fixture(scope="module")
def checkpoint(saved_model, tmp_path_factory):
    """A checkpoint folder as the trainer writes it (tiny: no optimizer state yet)."""
    from flamingo.model.config import FlamingoConfig
    from flamingo.model.weights import load_weights_file
    from flamingo.training import checkpoint as ckpt

    state = {"step": 3, "world_size": 1, "strategy": "ddp", "optimizer": None, "data": [{}],
             "rng": [ckpt.rng_state()], "counters": {"skipped_steps": 0}}
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("ckpt"), 3, load_weights_file(saved_model / "bridge.safetensors"),
                                state, FlamingoConfig.load(saved_model / "config.yaml"))


STATE_DAMAGE = [
    ("step", -1), ("step", "3"), ("world_size", 0), ("data", None), ("data", [{}, {}]), ("rng", [{}]),
    ("rng", "x"), ("optimizer", 5), ("optimizer", {"state": []}), ("counters", {"skipped_steps": -1}),
    ("format", "other-format"),
]


@pytest.mark.parametrize("key, value", STATE_DAMAGE, ids=lambda v: str(v)[:20])
def test_tampered_state_pt(checkpoint, tmp_path, key, value):
    import shutil

    from flamingo.training import checkpoint as ckpt

    folder = Path(shutil.copytree(checkpoint, tmp_path / "step"))
    state = torch.load(folder / "state.pt", weights_only=True)
    state[key] = value
    torch.save(state, folder / "state.pt")
    expect_user_error(lambda: ckpt.load_checkpoint(folder), expect=["state.pt", key if key != "format" else "not a"],
                      exc=ckpt.CheckpointLoadError, watch=[tmp_path])


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "state.pt").write_bytes(b"garbage"), "state.pt"),
    (lambda f: (f / "state.pt").unlink(), "not a training checkpoint"),
    (lambda f: (f / "bridge.safetensors").write_bytes(b"\x00" * 16), "unreadable"),
    (lambda f: torch.save([1, 2, 3], f / "state.pt"), "state.pt"),
], ids=["garbage", "missing", "weights", "list"])
def test_damaged_checkpoint_files(checkpoint, tmp_path, damage, message):
    import shutil

    from flamingo.training import checkpoint as ckpt

    folder = Path(shutil.copytree(checkpoint, tmp_path / "step"))
    damage(folder)
    expect_user_error(lambda: ckpt.load_checkpoint(folder), expect=message, exc=ckpt.CheckpointLoadError,
                      watch=[tmp_path])


def test_checkpoint_on_a_full_disk_leaves_no_partial_folder(checkpoint, tmp_path, monkeypatch):
    from flamingo.model.config import FlamingoConfig
    from flamingo.training import checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    expect_user_error(lambda: ckpt.save_checkpoint(tmp_path, 7, {}, {"step": 7}, FlamingoConfig()),
                      expect=["step-00000007", "No space left"], exc=ckpt.CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------- eval records, data
RECORD_DAMAGE = [
    ('[1, 2]', "expected a JSON object"), ('{"shots": "4", "trial": 0, "id": "a", "status": "ok"}', "shots"),
    ('{"shots": 4, "trial": 0, "id": ["a"], "status": "ok"}', "'id'"),
    ('{"shots": 4, "trial": 0, "id": "a", "status": "done"}', "status"),
    ('{"shots": 4, "trial": 0, "id": "a", "status": "ok", "prediction": 5}', "prediction"),
    ('{"shots": 4, "trial": 0, "id": "a", "status": "ok", "ranked": "cat"}', "ranked"),
    ('{"shots": 4, "trial": 0, "id": "a", "status": "ok", "ranked": [], "scores": ["x"]}', "scores"),
    ('{"shots": 4, "trial": 0, "id": "a", "status": "ok"}', "without 'prediction'"),
    ("not json at all", "not valid JSON"),
]


@pytest.mark.parametrize("line, message", RECORD_DAMAGE, ids=lambda v: str(v)[:24])
def test_tampered_prediction_records(tmp_path, line, message):
    from flamingo.evaluation import EvalDataError
    from flamingo.evaluation.records import read_all

    good = '{"shots": 0, "trial": 0, "id": "z", "status": "ok", "prediction": "a cat"}'
    (tmp_path / "coco.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    expect_user_error(lambda: read_all(tmp_path, "coco"), expect=["coco.jsonl", "line 2", message],
                      exc=EvalDataError, watch=[tmp_path])


def test_non_utf8_prediction_records(tmp_path):
    from flamingo.evaluation import EvalDataError
    from flamingo.evaluation.records import read_all

    (tmp_path / "coco.jsonl").write_bytes(b'{"id": "\xff"}\n')
    expect_user_error(lambda: read_all(tmp_path, "coco"), expect=["coco.jsonl", "not UTF-8"], exc=EvalDataError)


DATA_CONFIGS = [
    ("tasks: [coco]\n", "'tasks' mapping"),
    ("tasks: {coco: {test: 5}}\n", "tasks.coco.test"),
    ("tasks: {coco: {test: {annotations: [a.json]}}}\n", "tasks.coco.test.annotations"),
    ("tasks: {coco: {test: {annotation: a.json}}}\n", "unknown field(s) ['annotation']"),
    ("tasks: {coco: {val: {annotations: a.json}, test: {}}}\n", "unknown split(s)"),
    ("tasks: {coco: {}}\n", "'test' split"),
    ("root: 5\ntasks: {}\n", "root"),
    ("extra: 1\ntasks: {}\n", "unknown top-level field(s)"),
    ("tasks: {1: {test: {}}, a: {test: {}}}\nb: 2\n", "unknown top-level field(s)"),
]


@pytest.mark.parametrize("text, message", DATA_CONFIGS, ids=lambda v: str(v)[:24])
def test_eval_data_config(tmp_path, text, message):
    from flamingo.evaluation import EvalDataError
    from flamingo.data.benchmarks.data_config import load_data_config

    (tmp_path / "data.yaml").write_text(text)
    expect_user_error(lambda: load_data_config(tmp_path / "data.yaml"), expect=["data.yaml", message],
                      exc=EvalDataError, watch=[tmp_path])


# ---------------------------------------------------------------------------- train configs
@pytest.mark.parametrize("override, field", [
    ("steps=x", "steps"), ("optim.betas=[1, 2, 3]", "optim.betas"), ("datasets.0=5", "datasets.0"),
    ("model.vision.kind=features2", "vision.kind"), ("optim.lr_delay={perceiver: -1}", "optim.lr_delay"),
    ("checkpoint.keep=-1", "checkpoint.keep"), ("distributed.strategy=fsdp", "min_images"),
], ids=lambda v: str(v)[:24])
def test_train_config_overrides(tmp_path, override, field):
    from flamingo.model.config import ConfigError
    from flamingo.training.config import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"model": {}, "datasets": [{"name": "d", "kind": "pairs", "path": "x",
                                                               "min_images": 0}]}))
    expect_user_error(lambda: load_train_config(path, [override]), expect=field, exc=ConfigError, watch=[tmp_path])


def test_user_error_family():
    """Every user-facing error class is a UserError (the CLI's one-line contract depends on it)."""
    from flamingo.data.config import DataError
    from flamingo.evaluation import EvalDataError
    from flamingo.inference.generation import GenerationConfigError
    from flamingo.inference.prompt import PromptError
    from flamingo.model.config import ConfigError
    from flamingo.model.embedded import EmbeddedModelError
    from flamingo.model.image_processing import ImageProcessingError
    from flamingo.model.weights import CheckpointError
    from flamingo.training.checkpoint import CheckpointLoadError, CheckpointWriteError

    for cls in (DataError, EvalDataError, GenerationConfigError, PromptError, ConfigError, EmbeddedModelError,
                ImageProcessingError, CheckpointError, CheckpointLoadError, CheckpointWriteError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(EmbeddedModelError, ImportError)
