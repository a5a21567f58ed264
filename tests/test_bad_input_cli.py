"""Bad-input corpus, command line: every case must end with exit code 2 and one line naming the
option, field or file, no traceback, and nothing written outside the output folder.
See tests/bad_input.py for the contract."""

from __future__ import annotations

import pytest
import yaml
from bad_input import changes, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- harness
def test_snapshot_sees_created_changed_and_deleted_files(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "out").mkdir()
    before = snapshot([tmp_path])
    (tmp_path / "a").write_text("2")
    (tmp_path / "b").write_text("")
    (tmp_path / "out" / "c").write_text("")
    diff = changes(before, snapshot([tmp_path]), allowed=[tmp_path / "out"])
    assert diff == [f"changed: {tmp_path / 'a'}", f"created: {tmp_path / 'b'}"]


# ------------------------------------------------------------------------ numeric options
# Every numeric option of every command, with values that are malformed, out of range or absurd:
# argparse refuses them before anything runs (so no table of 0.0% for `--episodes -4`).
COMMANDS = {
    "demo": ["demo"],
    "eval-procedural": ["eval-procedural"],
    "generate": ["generate", "--prompt", "x"],
    "chat": ["chat"],
    "eval": ["eval", "--model", "m", "--task", "coco", "--data", "d.yaml", "--out", "out"],
    "data convert": ["data", "convert", "src", "out", "--kind", "pairs"],
    "data validate": ["data", "validate", "src", "--kind", "pairs"],
    "data shapes": ["data", "shapes", "out", "--kind", "pairs"],
    "data clipart": ["data", "clipart", "out"],
}
HUGE = str(10**30)
NUMERIC_OPTIONS = [
    ("demo", "--episodes", ["-1", "0", "x", HUGE]),
    ("demo", "--seed", ["-1", "2.5", HUGE]),
    ("eval-procedural", "--episodes", ["-4", "0", "1e3"]),
    ("eval-procedural", "--seeds", ["0", "-1", HUGE]),
    ("eval-procedural", "--shots", ["-1", "a,b", "", "4,4", HUGE, "0,,100000"]),
    ("generate", "--max-new-tokens", ["0", "-5", "x", HUGE]),
    ("generate", "--beams", ["0", "-1", "1000000", "2.0"]),
    ("generate", "--length-penalty", ["nan", "inf", "1e308", "x"]),
    ("generate", "--top-k", ["-1", "x"]),
    ("generate", "--seed", ["-1", HUGE, "x"]),
    ("generate", "--max-pixels", ["0", "-1", "x"]),
    ("chat", "--max-new-tokens", ["0", HUGE]),
    ("chat", "--seed", ["-2", HUGE]),
    ("chat", "--top-k", ["-3"]),
    ("eval", "--shots", ["-1", "x", "4,4", HUGE]),
    ("eval", "--trials", ["0", "-1", HUGE]),
    ("eval", "--support-size", ["0", "-7"]),
    ("eval", "--max-queries", ["0"]),
    ("eval", "--seed", ["-1", HUGE]),
    ("eval", "--batch-size", ["0", HUGE]),
    ("eval", "--beams", ["0", HUGE]),
    ("eval", "--max-new-tokens", ["0", HUGE]),
    ("eval", "--video-frames", ["0", HUGE]),
    ("eval", "--video-fps", ["0", "-3", "nan", "inf"]),
    ("eval", "--max-prompt-tokens", ["0"]),
    ("data convert", "--shard-size", ["0", "-1"]),
    ("data convert", "--seed", ["-1", HUGE]),
    ("data convert", "--frame-fps", ["0", "nan", "inf"]),
    ("data validate", "--workers", ["-1", HUGE]),
    ("data shapes", "--n", ["0", "-1", HUGE]),
    ("data shapes", "--seed", ["-1"]),
    ("data shapes", "--shard-size", ["0"]),
    ("data clipart", "--n", ["0", "-1", HUGE]),
    ("data clipart", "--seed", ["-1", HUGE]),
    ("data clipart", "--shard-size", ["0"]),
]


@pytest.mark.parametrize("command, option, value", [
    (command, option, value) for command, option, values in NUMERIC_OPTIONS for value in values],
    ids=lambda v: str(v)[:20])
def test_numeric_option_out_of_range(tmp_path, monkeypatch, command, option, value):
    monkeypatch.chdir(tmp_path)
    run_cli([*COMMANDS[command], f"{option}={value}"], expect=f"argument {option}:", watch=[tmp_path])


def test_eval_offline_json_into_a_missing_folder_is_refused_before_the_evaluation(tmp_path, monkeypatch):
    import os

    from flamingo.model import weights

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded: the bad --json was found out too late")

    monkeypatch.setattr(weights, "load_model", no_load)
    run_cli(["eval-offline", "--task", "shape", "--json", str(tmp_path / "nowhere" / "r.json")],
            expect=["--json", "nowhere"], watch=[tmp_path])
    run_cli(["eval-offline", "--task", "shape", "--json", str(tmp_path)], expect=["--json", "not a file"],
            watch=[tmp_path])
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and str(path) != str(tmp_path))
    run_cli(["eval-offline", "--task", "shape", "--json", str(tmp_path / "r.json")], expect=["--json", "read-only"],
            watch=[tmp_path])


# ----------------------------------------------------------------------- model configs
def _config_cases():
    """(YAML text, expected field) for every field of every section: wrong type, out of range,
    unknown key."""
    wrong_type = {str: 5, int: "many", float: "fast", bool: "maybe"}
    sections = {
        "vision": {"kind": (str, "resnet"), "name_or_path": (str, None), "image_size": (int, None),
                   "mean": (list, [1, 2]), "std": (list, [1, 2, 3, 4]), "pretrained": (bool, None),
                   "colour_bins": (int, 99)},
        "lm": {"name_or_path": (str, None), "revision": (str, None), "dtype": (str, "float8"),
               "attn_implementation": (str, None), "trust_remote_code": (bool, None),
               "decoder_layers_path": (str, None), "gguf_file": (str, None)},
        "perceiver": {"depth": (int, 0), "num_latents": (int, -1), "heads": (int, 0), "head_dim": (int, 0),
                      "ffw_mult": (int, 0), "max_frames": (int, -1), "dim": (int, 0)},
        "cross_attention": {"every": (int, 0), "first_layer": (int, -1), "heads": (int, 0), "head_dim": (int, -2),
                            "ffw_mult": (int, 0), "media_attention": (str, "later"),
                            "skip_tokens_without_media": (bool, None)},
    }
    cases = []
    for section, fields in sections.items():
        for name, (kind, out_of_range) in fields.items():
            bad = [1, "x"] if kind is list else wrong_type[kind]
            cases.append((yaml.safe_dump({section: {name: bad}}), f"{section}.{name}"))
            if out_of_range is not None:
                cases.append((yaml.safe_dump({section: {name: out_of_range}}), f"{section}.{name}"))
        cases.append((yaml.safe_dump({section: {"colour": 1}}), "unknown field(s) ['colour']"))
        cases.append((yaml.safe_dump({section: [1, 2]}), section))
    for name, bad in [("activation", "relu"), ("activation", 3), ("bias", "no"), ("media_token", 5),
                      ("media_token", ""), ("end_of_chunk_token", ["x"]), ("end_of_chunk_token", "<image>")]:
        cases.append((yaml.safe_dump({name: bad}), name))
    cases.append((yaml.safe_dump({"visual": {}}), "unknown field(s) ['visual']"))
    return cases


@pytest.mark.parametrize("text, field", _config_cases(), ids=lambda v: str(v)[:40])
def test_params_bad_model_config(tmp_path, text, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    run_cli(["params", str(bad)], expect=field, watch=[tmp_path])


# Files that are not configs at all: every reader of a YAML/JSON file refuses them the same way.
def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


BAD_FILES = [
    ("syntax.yaml", "perceiver: {depth: 2\n", ":2:1: invalid YAML"),
    ("tabs.yaml", "perceiver:\n\tdepth: 2\n", ":2:1: invalid YAML"),
    ("syntax.json", '{"perceiver": {"depth": 2}', ":1:27: invalid JSON"),
    ("latin1.yaml", "media_token: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("binary.yaml", bytes(range(256)), "not UTF-8"),
    ("nested.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("nested.json", '{"a": ' + "[" * 100000 + "]" * 100000 + "}", "nested deeper than"),
    ("bomb.yaml", _alias_bomb(), "aliases are expanded"),
    ("huge.yaml", "# " + "x" * (5 << 20) + "\n", "bytes; expected at most"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping"),
    ("scalar.yaml", "42\n", "expected a mapping"),
    ("python.yaml", "perceiver: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("command", ["params", "train", "eval"])
def test_unreadable_config_files(tmp_path, command, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = {"params": ["params", str(path)], "train": ["train", str(path), "--print-config"],
            "eval": ["eval", "--model", "m", "--task", "coco", "--data", str(path), "--out", str(tmp_path / "out")]}
    if command == "train" and message == "expected a mapping":
        message = "expected a mapping at the top level"
    if command == "eval" and message == "expected a mapping":
        message = "'tasks' mapping"
    run_cli(argv[command], expect=[name, message], watch=[tmp_path])


@pytest.mark.parametrize("command", ["params", "train"])
def test_missing_and_directory_configs(tmp_path, command):
    extra = ["--print-config"] if command == "train" else []
    run_cli([command, str(tmp_path / "nope.yaml"), *extra], expect="nope.yaml", watch=[tmp_path])
    if command == "train":
        run_cli([command, str(tmp_path), *extra], expect=[str(tmp_path), "is a directory"], watch=[tmp_path])


# ------------------------------------------------------------------------ train configs
TRAIN_BASE = {"model": {"lm": {"name_or_path": "unused"}}, "datasets": [{"name": "shapes", "kind": "synthetic_shapes"}]}
TRAIN_CASES = [
    ("steps", "many"), ("steps", 0), ("steps", -1), ("steps", 1.5), ("accumulation", 0), ("accumulation", "x"),
    ("objective", "sum"), ("precision", "fp8"), ("frozen_dtype", "int8"), ("gradient_checkpointing", "yes"),
    ("device", "banana"), ("device", 1), ("seed", "x"), ("threads", 0), ("threads", "all"),
    ("max_nonfinite_in_a_row", 0), ("run_dir", 5), ("init_from", ["a"]), ("steps", 10**30), ("threads", 100000),
    ("optim.lr", 0), ("optim.lr", "fast"), ("optim.lr", -1), ("optim.betas", [0.9]), ("optim.betas", [0.9, 1.5]),
    ("optim.eps", 0), ("optim.weight_decay", -0.1), ("optim.no_decay", "perceiver"), ("optim.no_decay", [1]),
    ("optim.decay_norms_biases_gates", 2), ("optim.grad_clip", -1), ("optim.lr_scale", [1]),
    ("optim.lr_scale", {"perceiver": -1}), ("optim.lr_delay", {"perceiver": 1.5}), ("optim.momentum", 0.9),
    ("schedule.kind", "exponential"), ("schedule.warmup_steps", -1), ("schedule.min_lr_ratio", 2),
    ("checkpoint.every", 0), ("checkpoint.keep", 0), ("checkpoint.dir", 3), ("logging.every", 0),
    ("logging.tensorboard", "on"), ("distributed.strategy", "zero3"), ("distributed.timeout_minutes", 0),
    ("distributed.backend", 1), ("datasets", []), ("datasets", "shapes"), ("datasets", [5]),
    ("datasets", [{"name": "a"}]), ("datasets.0.weight", -1), ("datasets.0.weight", "heavy"),
    ("datasets.0.batch_size", 0), ("datasets.0.batch_size", 10**12), ("datasets.0.name", 5),
    ("model", 5), ("model.perceiver.depth", 0), ("model.lm.name_or_path", 5), ("model.media_token", 5),
    ("optimizer", {}),
]


def _set(data: dict, dotted: str, value) -> dict:
    import copy

    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("field, value", TRAIN_CASES, ids=lambda v: str(v)[:30])
def test_train_bad_config_field(tmp_path, monkeypatch, field, value):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_set(TRAIN_BASE, field, value)))
    expect = field.split(".")[-1] if not field.startswith("datasets.") else field.split(".")[-1]
    run_cli(["train", str(path), "--print-config"], expect=[expect], watch=[tmp_path])


@pytest.mark.parametrize("override, field", [
    ("steps=-1", "steps"), ("optim.lr=fast", "optim.lr"), ("datasets.7.weight=1", "datasets.7"),
    ("steps", "expected KEY=VALUE"), ("optim.lr.x=1", "optim.lr"), ("model.perceiver.depth=[1]", "perceiver.depth"),
    ("steps=" + "[" * 3000, "steps"), ("steps=" + "x" * 100000, "steps"),
], ids=lambda v: str(v)[:20])
def test_train_bad_override(tmp_path, monkeypatch, override, field):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN_BASE))
    run_cli(["train", str(path), override, "--print-config"], expect=field, watch=[tmp_path])


# ------------------------------------------------------------------- generate: images, prompts
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    Image.new("RGB", (60, 60), "blue").save(folder / "big.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "red.png").read_bytes()[:60])
    (folder / "html.jpg").write_text("<html></html>")
    (folder / "dir.png").mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    return folder


@pytest.mark.parametrize("image, prompt, extra, message", [
    ("empty.png", "<image>x", [], "empty.png"),
    ("text.png", "<image>x", [], "text.png"),
    ("truncated.png", "<image>x", [], "truncated.png"),
    ("html.jpg", "<image>x", [], "html.jpg"),
    ("missing.png", "<image>x", [], "missing.png"),
    ("dir.png", "<image>x", [], "dir.png"),
    ("loop.png", "<image>x", [], "loop.png"),
    ("dangling.png", "<image>x", [], "dangling.png"),
    ("big.png", "<image>x", ["--max-pixels", "100"], "3600"),
    ("red.png", "<image><image>x", [], "placeholder"),
    ("red.png", "no placeholder", [], "placeholder"),
    ("red.png", "<image>x\udcff", [], "prompt: not valid UTF-8"),
    ("red.png", "<image>x", ["--temperature", "0"], "temperature"),
    ("red.png", "<image>x", ["--temperature", "nan"], "temperature"),
    ("red.png", "<image>x", ["--temperature", "inf"], "temperature"),
    ("red.png", "<image>x", ["--top-p", "0"], "top_p"),
    ("red.png", "<image>x", ["--top-p", "1.5"], "top_p"),
    ("red.png", "<image>x", ["--sample", "--beams", "2"], "choose sampling or beam search"),
    ("red.png", "<image>x", ["--stop", ""], "stop_strings"),
])
def test_generate_bad_input_before_loading(images, tmp_path, monkeypatch, image, prompt, extra, message):
    monkeypatch.chdir(tmp_path)
    run_cli(["generate", "--model", str(tmp_path / "never-loaded"), "--image", str(images / image),
             "--prompt", prompt, *extra], expect=message, watch=[tmp_path, images])


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/nope/model", "nope/model"),
    ("{tmp}/empty-dir", "not a saved Flamingo model directory"),
    ("{tmp}/notes.txt", "notes.txt"),
    ("../../etc/passwd", "passwd"),
])
def test_bad_model_spec(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    run_cli(["params", spec.format(tmp=tmp_path)], expect=message, watch=[tmp_path])


# --------------------------------------------------------------- saved models, checkpoints
@pytest.fixture(scope="module")
def saved_model(lm_dir, clip_dir, tmp_path_factory):
    from conftest import build_with_vision

    from flamingo.model.weights import save_pretrained

    return save_pretrained(build_with_vision(lm_dir("llama"), clip_dir), tmp_path_factory.mktemp("saved") / "model")


def _edit_yaml(path, section, field, value):
    data = yaml.safe_load(path.read_text())
    data[section][field] = value
    path.write_text(yaml.safe_dump(data))


def _copy_model(saved_model, tmp_path):
    import shutil

    return shutil.copytree(saved_model, tmp_path / "model")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "bridge.safetensors").unlink(), "bridge.safetensors"),
    (lambda d: (d / "bridge.safetensors").write_bytes(b"\x00" * 10), "bridge.safetensors"),
    (lambda d: (d / "bridge.safetensors").write_bytes(b""), "bridge.safetensors"),
    (lambda d: (d / "bridge.safetensors").write_bytes((d / "bridge.safetensors").read_bytes()[:200]),
     "bridge.safetensors"),
    (lambda d: _edit_yaml(d / "config.yaml", "perceiver", "depth", 1), "does not match the model"),
    (lambda d: _edit_yaml(d / "config.yaml", "lm", "name_or_path", "/nonexistent/lm"), "lm.name_or_path"),
    (lambda d: _edit_yaml(d / "config.yaml", "vision", "name_or_path", "/nonexistent/clip"), "vision.name_or_path"),
    (lambda d: (d / "config.yaml").write_text("lm: {name_or_path: 5}\n"), "lm.name_or_path"),
    (lambda d: (d / "config.yaml").write_text("media_token: 5\n"), "media_token"),
    (lambda d: (d / "config.yaml").write_bytes(b"\xff\xfe"), "not UTF-8"),
    (lambda d: (d / "config.yaml").write_text(_alias_bomb()), "aliases"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml"),
])
def test_damaged_model_directory(saved_model, tmp_path, damage, message):
    model = _copy_model(saved_model, tmp_path)
    damage(model)
    run_cli(["params", str(model)], expect=message, watch=[tmp_path])


@pytest.mark.parametrize("section, field, value, message", [
    ("lm", "gguf_file", "../../../etc/passwd", ["lm.gguf_file", "inside the language model's directory"]),
    ("lm", "gguf_file", "/etc/passwd", ["lm.gguf_file", "no absolute path"]),
    ("lm", "gguf_file", "not-gguf.gguf", ["lm.gguf_file", "cannot be read as a GGUF"]),
    ("lm", "gguf_file", "missing.gguf", ["lm.gguf_file", "not found"]),
    ("lm", "attn_implementation", "nonsense", ["lm.attn_implementation", "nonsense"]),
    ("vision", "image_size", 100000, ["vision.image_size", "4096"]),
])
def test_model_config_values_that_fail_while_building(lm_dir, clip_dir, tmp_path, monkeypatch, section, field,
                                                      value, message):
    """Values the config's own checks cannot judge (they need the LM's files), found while the
    model is built: one line naming the field, not a traceback (a ValueError of transformers or
    of the GGUF reader, an out-of-memory kill for a 100000 px image), and a GGUF file is only ever
    read inside the LM's own directory."""
    import shutil

    from conftest import tiny_config

    lm = shutil.copytree(lm_dir("llama"), tmp_path / "lm")
    (lm / "not-gguf.gguf").write_text("hello")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    data = tiny_config(lm).to_dict()
    data["vision"]["name_or_path"] = str(clip_dir)
    data[section][field] = value
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    run_cli(["params", str(path)], expect=message, watch=[tmp_path])
    assert not [f for f in opened if "passwd" in f]


@pytest.mark.parametrize("device", ["banana", "cuda:x", "tpu", "cuda:99"])
def test_eval_device_that_does_not_exist(tmp_path, device):
    import torch

    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    run_cli(["eval", "--model", "m", "--task", "coco", "--data", "d.yaml", "--out", str(tmp_path / "out"),
             "--device", device], expect="argument --device", watch=[tmp_path])


@pytest.mark.parametrize("device", ["tpu", "banana", "cuda:x"])
def test_serve_device_that_does_not_exist_is_refused_before_the_model_loads(tmp_path, monkeypatch, device):
    monkeypatch.setattr("flamingo.serving.cli.load_model_quietly", lambda *a, **k: pytest.fail("the model was loaded"))
    run_cli(["serve", "--model", str(tmp_path / "never-loaded"), "--device", device], expect="argument --device",
            watch=[tmp_path])


@pytest.mark.parametrize("path", ["", "missing-folder"])
def test_serve_local_media_path_must_name_a_folder(tmp_path, monkeypatch, path):
    """An empty --allowed-local-media-path used to allow the working directory."""
    monkeypatch.chdir(tmp_path)
    run_cli(["serve", "--allowed-local-media-path", path], expect="argument --allowed-local-media-path",
            watch=[tmp_path])


def test_train_on_cuda_without_a_gpu(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_set(_set(TRAIN_BASE, "device", "cuda"), "steps", 1)))
    run_cli(["train", str(path)], expect="device", watch=[tmp_path], allowed=[tmp_path / "runs"])


def test_serve_subprocess_tries_another_port_when_its_port_was_taken(saved_model, monkeypatch):
    """The harness's free port can be taken before the server binds it (the server then exits 3):
    it tries another port instead of failing the test that asked for a server."""
    import socket

    from bad_input import serve_subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        probed = []

        class FirstProbeFindsTheTakenPort(socket.socket):
            def getsockname(self):
                probed.append(1)
                return ("127.0.0.1", taken.getsockname()[1]) if len(probed) == 1 else super().getsockname()

        monkeypatch.setattr(socket, "socket", FirstProbeFindsTheTakenPort)
        with serve_subprocess(["--model", str(saved_model)]) as (_, url):
            assert len(probed) == 2 and not url.endswith(f":{taken.getsockname()[1]}")


# ---------------------------------------------------------------------------------- chat
def test_chat_survives_a_non_utf8_line(saved_model, monkeypatch, capsys):
    """One undecodable line is reported, and the session goes on (exit 0 at /quit)."""
    import io

    from flamingo.cli import main

    script = b"\xff\xfe bad bytes\nhello\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8"))
    assert main(["chat", "--model", str(saved_model), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "that line: not valid UTF-8" in captured.out and captured.out.count("Flamingo:") == 1
    assert "Traceback" not in captured.err
