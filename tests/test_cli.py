"""The command line: help that teaches by example, the configs we ship, clear errors."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from bad_input import serve_subprocess

from flamingo import FlamingoConfig
from flamingo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "flamingo demo" in out and "convert-openflamingo" in out and "params" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = FlamingoConfig.load(path)
    assert config.cross_attention_layers(32)


def test_params_on_a_bad_config_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("perceiver: {depth: -1}\n")
    assert main(["params", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flamingo params: error: config field perceiver.depth: expected an integer >= 1, got -1"
    assert main(["params", str(tmp_path)]) == 2
    assert "not a saved Flamingo model directory" in capsys.readouterr().err


# ------------------------------------------------------------------------- generate and chat
@pytest.fixture(scope="module")
def saved_model(lm_dir, clip_dir, tmp_path_factory):
    from conftest import build_with_vision, randomize_gates

    from flamingo.model.weights import save_pretrained

    model = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(model)
    return save_pretrained(model, tmp_path_factory.mktemp("saved") / "model")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_ctrl_c_or_sigterm_cleanly(saved_model, signum):
    """`flamingo serve` in its own process: ready, then a signal; it exits 128 + the signal's
    number with no traceback (uvicorn's own re-raise of the signal used to cancel the app's
    lifespan after the shutdown and log one)."""
    with serve_subprocess(["--model", str(saved_model)]) as (server, _):
        server.send_signal(signum)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 128 + signum and "Traceback" not in err.decode(), err.decode()[-3000:]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    Image.new("CMYK", (30, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (50, 50), "blue").save(folder / "big.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "red.png").read_bytes()[:60])
    return folder


def test_generate_prints_text_and_json(saved_model, images, capsys):
    import json

    args = ["generate", "--model", str(saved_model), "--image", str(images / "red.png"),
            "--image", str(images / "cmyk.jpg"), "--prompt", "<image>An image of<|endofchunk|><image>An",
            "--max-new-tokens", "4", "--no-stop-at-eoc"]
    assert main(args) == 0
    text = capsys.readouterr().out.strip()
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"].strip() == text and record["new_tokens"] == 4 and record["finish_reason"] == "length"
    assert main(args + ["--beams", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] is not None
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out.strip() == text


@pytest.mark.parametrize("image, prompt, extra, message", [
    ("empty.png", "<image>x", [], "is empty"),
    ("text.png", "<image>x", [], "text.png"),
    ("truncated.png", "<image>x", [], "truncated.png"),
    ("missing.png", "<image>x", [], "missing.png"),
    ("big.png", "<image>x", ["--max-pixels", "100"], "2500"),
    ("red.png", "<image><image>x", [], r"2 <image> placeholder\(s\) but 1 image\(s\)"),
    ("red.png", "<image>" + "the quick brown fox " * 100, [], "context is 256 tokens"),
    ("red.png", "<image>x", ["--temperature", "0"], "temperature: expected > 0"),
    ("red.png", "<image>x", ["--sample", "--beams", "2"], "choose sampling or beam search"),
])
def test_generate_bad_input_is_one_clear_line(saved_model, images, capsys, image, prompt, extra, message):
    import re

    code = main(["generate", "--model", str(saved_model), "--image", str(images / image), "--prompt", prompt,
                 "--max-new-tokens", "3", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("flamingo generate: error:") and "\n" not in err
    assert re.search(message, err), err


def test_generate_unknown_option_and_missing_model(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "x", "--prompt", "x", "--beam-width", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --beam-width" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope" / "model"), "--prompt", "x"]) == 2
    assert "expected a saved model directory" in capsys.readouterr().err


def test_chat_loop_with_scripted_input(saved_model, images):
    from flamingo.inference.chat import DIALOGUE_PROMPT, build_prompt, run_chat
    from flamingo.inference.generation import GenerationConfig
    from flamingo.model.weights import load_pretrained

    model = load_pretrained(saved_model)
    script = iter([f"/image {images / 'red.png'}", "What is this?", "/image nowhere.png", "/frobnicate",
                   "And now?", "/reset", "Hello", "/quit", "never read"])
    shown = []

    def read(prompt):
        return next(script)

    history = run_chat(model, GenerationConfig(max_new_tokens=3), read, shown.append)
    out = "".join(shown)
    assert "(image" in out and "attached" in out
    assert "error:" in out and "nowhere.png" in out
    assert "unknown command '/frobnicate'" in out and "(history cleared)" in out
    assert next(script) == "never read"  # /quit ended the loop
    assert out.count("Flamingo:") == 3
    # after /reset only the last exchange remains, and it is a well-formed dialogue turn
    assert len(history) == 2 and history[0].text == "User: Hello\nFlamingo:" and not history[0].images
    assert history[1].text.endswith("<|endofchunk|>\n")
    prompt = build_prompt(model, history)
    assert prompt.text.startswith(DIALOGUE_PROMPT)
