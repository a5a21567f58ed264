"""Bad-input corpus, data and model files: hostile or broken datasets (media paths leading out of
the dataset folder, undecodable images, decompression bombs), configs that ask to run a model's
own code, outputs that already exist, and damaged checkpoints. Every case must end with exit code
2 (or the right exception) and a message naming the file or field, no traceback, and nothing
created or changed outside the output folder (here: nothing at all). See tests/bad_input.py."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import expect_user_error, run_cli
from conftest import tiny_config
from safetensors.torch import save_file
from test_data import bad_checksum_png, bomb_png, shape_png
from test_training import tiny_train_dict

from flamingo.model.weights import CONFIG_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALLOW = "--allow-absolute-paths"


# ------------------------------------------------------------- media outside the dataset folder
def hostile_world(tmp_path: Path) -> tuple[Path, Path]:
    """(dataset folder, a folder outside it holding a valid image, frames and a symlink chain)."""
    outside = tmp_path / "outside"
    (outside / "frames").mkdir(parents=True)
    (outside / "secret.png").write_bytes(shape_png("square"))
    for i in range(3):
        (outside / "frames" / f"f{i}.png").write_bytes(shape_png("circle"))
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "images" / "link.png").symlink_to(outside / "secret.png")
    (ds / "images" / "link2.png").symlink_to(ds / "images" / "link.png")
    (ds / "images" / "relative-link.png").symlink_to(Path("..") / ".." / "outside" / "secret.png")
    (ds / "linked").symlink_to(outside, target_is_directory=True)
    (ds / "clips").mkdir()
    (ds / "clips" / "frames").mkdir()
    (ds / "clips" / "frames" / "f0.png").symlink_to(outside / "frames" / "f0.png")
    return ds, outside


IMAGE_REFS = {
    "absolute": lambda outside: str(outside / "secret.png"),
    "absolute-system-file": lambda outside: "/etc/passwd",
    "dotdot": lambda outside: "../outside/secret.png",
    "dotdot-inside-then-out": lambda outside: "images/../../outside/secret.png",
    "dotdot-to-the-root": lambda outside: "../" * 12 + "etc/hostname",
    "symlinked-folder": lambda outside: "linked/secret.png",
    "symlinked-file": lambda outside: "images/link.png",
    "symlink-to-symlink": lambda outside: "images/link2.png",
    "relative-symlink": lambda outside: "images/relative-link.png",
    "dict-path-absolute": lambda outside: {"path": str(outside / "secret.png")},
    "dict-image_path-dotdot": lambda outside: {"image_path": "../outside/secret.png"},
    "dict-file-symlinked-folder": lambda outside: {"file": "linked/secret.png"},
}


def pairs_jsonl(tmp_path: Path, ref) -> Path:
    ds, outside = hostile_world(tmp_path)
    value = ref(outside)
    (ds / "data.jsonl").write_text(json.dumps({"image": value, "caption": "a hostile sample"}) + "\n")
    return ds / "data.jsonl"


@pytest.mark.parametrize("ref", IMAGE_REFS.values(), ids=IMAGE_REFS.keys())
def test_convert_refuses_image_paths_leading_out_of_the_dataset(tmp_path, ref):
    jsonl = pairs_jsonl(tmp_path, ref)
    run_cli(["data", "convert", str(jsonl), str(tmp_path / "out"), "--kind", "pairs"],
            expect=["data.jsonl:1", "unsafe_path", ALLOW], watch=[tmp_path])


@pytest.mark.parametrize("ref", IMAGE_REFS.values(), ids=IMAGE_REFS.keys())
def test_validate_strict_counts_image_paths_leading_out_of_the_dataset(tmp_path, ref):
    jsonl = pairs_jsonl(tmp_path, ref)
    result = run_cli(["data", "validate", str(jsonl), "--kind", "pairs", "--strict"],
                     expect=["1 bad sample(s) of 1", str(jsonl)], watch=[tmp_path])
    assert "unsafe_path" in result.out and ALLOW in result.out


VIDEO_REFS = {
    "absolute-frame-folder": lambda outside: str(outside / "frames"),
    "dotdot-frame-folder": lambda outside: "../outside/frames",
    "symlinked-frame-folder": lambda outside: "linked/frames",
    "frame-folder-with-a-symlinked-frame": lambda outside: "clips/frames",
    "absolute-video-file": lambda outside: "/etc/passwd",
}


@pytest.mark.parametrize("command", ["convert", "validate"])
@pytest.mark.parametrize("ref", VIDEO_REFS.values(), ids=VIDEO_REFS.keys())
def test_video_paths_leading_out_of_the_dataset(tmp_path, ref, command):
    ds, outside = hostile_world(tmp_path)
    (ds / "data.jsonl").write_text(json.dumps({"video": ref(outside), "caption": "a hostile clip", "fps": 1}) + "\n")
    if command == "convert":
        run_cli(["data", "convert", str(ds / "data.jsonl"), str(tmp_path / "out"), "--kind", "video"],
                expect=["data.jsonl:1", "unsafe_path", ALLOW], watch=[tmp_path])
    else:
        result = run_cli(["data", "validate", str(ds / "data.jsonl"), "--kind", "video", "--strict"],
                         expect="1 bad sample(s) of 1", watch=[tmp_path])
        assert "unsafe_path" in result.out


def folder_with_links(tmp_path: Path, layout: str) -> tuple[Path, str]:
    ds, outside = hostile_world(tmp_path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("a hostile sample")
    if layout == "pairs-absolute-link":
        (folder / "x.png").symlink_to(outside / "secret.png")
    elif layout == "pairs-relative-link":
        (folder / "x.png").symlink_to(Path("..") / "outside" / "secret.png")
    elif layout == "video-linked-frame-folder":
        (folder / "x").symlink_to(outside / "frames", target_is_directory=True)
    else:  # a real frame folder with one frame linking out
        (folder / "x").mkdir()
        (folder / "x" / "f0.png").write_bytes(shape_png())
        (folder / "x" / "f1.png").symlink_to(outside / "frames" / "f1.png")
    return folder, "pairs" if layout.startswith("pairs") else "video"


FOLDER_LAYOUTS = ["pairs-absolute-link", "pairs-relative-link", "video-linked-frame-folder", "video-linked-frame"]


@pytest.mark.parametrize("command", ["convert", "validate"])
@pytest.mark.parametrize("layout", FOLDER_LAYOUTS)
def test_folder_files_linking_out_of_the_dataset(tmp_path, layout, command):
    folder, kind = folder_with_links(tmp_path, layout)
    if command == "convert":
        run_cli(["data", "convert", str(folder), str(tmp_path / "out"), "--kind", kind],
                expect=["folder/x", "unsafe_path", ALLOW], watch=[tmp_path])
    else:
        result = run_cli(["data", "validate", str(folder), "--kind", kind, "--strict"],
                         expect="1 bad sample(s) of 1", watch=[tmp_path])
        assert "unsafe_path" in result.out


def test_an_interleaved_document_loses_only_its_images_from_outside(tmp_path):
    """Not an error (the text is kept), but the outside file never reaches a shard."""
    from flamingo.data.convert import convert_to_shards

    ds, outside = hostile_world(tmp_path)
    images = [None, *(ref(outside) for ref in IMAGE_REFS.values())]
    (ds / "doc.json").write_text(json.dumps({"texts": ["Some text.", *[None] * (len(images) - 1)], "images": images}))
    report = convert_to_shards(str(ds), tmp_path / "out", "interleaved")
    assert dict(report.images_dropped) == {"unsafe_path": len(IMAGE_REFS)}
    secret = (outside / "secret.png").read_bytes()
    assert all(secret not in shard.read_bytes() for shard in report.shards)


# ---------------------------------------------------------------------------- broken images
BAD_IMAGES = {
    "truncated-png": lambda: shape_png()[:120],
    "truncated-jpeg": lambda: _jpeg()[:300],
    "bomb-header": lambda: bomb_png(),
    "bomb-one-row": lambda: bomb_png(10_000_000, 10),
    "zero-size": lambda: bomb_png(0, 0),
    "bad-checksum": bad_checksum_png,
    "empty": lambda: b"",
    "text": lambda: b"this is not an image\n",
    "html": lambda: b"<html><body>404 not found</body></html>",
    "random-bytes": lambda: bytes(range(256)) * 4,
    "gif-header-only": lambda: b"GIF89a\x10\x00\x10\x00",
    "png-signature-only": lambda: b"\x89PNG\r\n\x1a\n",
}


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["folder", "jsonl", "jsonl-data-uri"])
@pytest.mark.parametrize("make", BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_convert_skips_undecodable_images_and_fails_when_none_is_left(tmp_path, make, layout):
    ds = tmp_path / "ds"
    ds.mkdir()
    data = make()
    if layout == "folder":
        (ds / "x.png").write_bytes(data)
        (ds / "x.txt").write_text("a broken image")
        source, expect = ds, ["ds/x", "corrupt_image"]
    else:
        (ds / "x.png").write_bytes(data)
        ref = "x.png" if layout == "jsonl" else "data:image/png;base64," + base64.b64encode(data).decode()
        (ds / "data.jsonl").write_text(json.dumps({"image": ref, "caption": "a broken image"}) + "\n")
        source = ds / "data.jsonl"
        expect = [str(ds / "x.png") if layout == "jsonl" else "data.jsonl:1", "corrupt_image"]
    run_cli(["data", "convert", str(source), str(tmp_path / "out"), "--kind", "pairs"], expect=expect,
            watch=[tmp_path])


@pytest.mark.parametrize("max_pixels", ["1", "4095"])
def test_convert_refuses_images_over_max_pixels(tmp_path, max_pixels):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "x.png").write_bytes(shape_png())  # 64 x 64 = 4096 pixels
    (ds / "x.txt").write_text("a big image")
    run_cli(["data", "convert", str(ds), str(tmp_path / "out"), "--kind", "pairs", "--max-pixels", max_pixels],
            expect=["ds/x", f"max_pixels={max_pixels}"], watch=[tmp_path])


@pytest.mark.parametrize("what", ["random-bytes-mp4", "empty-mp4", "truncated-frame"])
def test_convert_skips_undecodable_videos(tmp_path, what):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "x.txt").write_text("a broken clip")
    if what == "random-bytes-mp4":
        (ds / "x.mp4").write_bytes(bytes(range(256)) * 8)
    elif what == "empty-mp4":
        (ds / "x.mp4").write_bytes(b"")
    else:
        (ds / "x").mkdir()
        (ds / "x" / "f0.png").write_bytes(shape_png())
        (ds / "x" / "f1.png").write_bytes(shape_png()[:100])
    run_cli(["data", "convert", str(ds), str(tmp_path / "out"), "--kind", "video"],
            expect=["ds/x", "corrupt_video"], watch=[tmp_path])


def _empty_tar() -> bytes:
    import io
    import tarfile

    data = io.BytesIO()
    tarfile.open(fileobj=data, mode="w").close()
    return data.getvalue()


def _pairs_tar() -> bytes:
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, payload in (("x.png", shape_png()), ("x.txt", b"a circle")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return data.getvalue()


UNREADABLE_SHARDS = {
    "random-bytes": lambda: random.Random(0).randbytes(4096),
    "empty-file": lambda: b"",
    "no-members": _empty_tar,
    "cut-header": lambda: _pairs_tar()[:300],
}


@pytest.mark.parametrize("make", UNREADABLE_SHARDS.values(), ids=UNREADABLE_SHARDS.keys())
def test_dedup_fails_when_no_training_record_can_be_read(tmp_path, make):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.png").write_bytes(shape_png())
    (tmp_path / "train.tar").write_bytes(make())
    run_cli(["data", "dedup", str(tmp_path / "train.tar"), "--eval", f"val={tmp_path / 'eval'}", "--hash-only",
             "--out", str(tmp_path / "out")], expect=["train.tar", "no training record could be read"],
            watch=[tmp_path])


# ---------------------------------------------------------------------- outputs that exist
def small_pairs(tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "x.png").write_bytes(shape_png())
    (ds / "x.txt").write_text("a circle")
    return ds


@pytest.mark.parametrize("prefix", [None, "part"])
def test_convert_refuses_a_folder_with_shards_of_the_prefix(tmp_path, prefix):
    ds = small_pairs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{prefix or 'shard'}-000000.tar").write_bytes(b"an earlier conversion")
    extra = ["--prefix", prefix] if prefix else []
    run_cli(["data", "convert", str(ds), str(out), "--kind", "pairs", *extra],
            expect=[str(out), "already has shards", "--overwrite"], watch=[tmp_path])


def test_convert_refuses_an_output_that_is_a_file(tmp_path):
    ds = small_pairs(tmp_path)
    (tmp_path / "out").write_text("a file")
    run_cli(["data", "convert", str(ds), str(tmp_path / "out"), "--kind", "pairs", "--overwrite"],
            expect=[str(tmp_path / "out"), "not a folder"], watch=[tmp_path])


@pytest.mark.parametrize("prefix", ["", ".hidden", "a/b", "a%d"])
def test_convert_refuses_bad_prefixes(tmp_path, prefix):
    ds = small_pairs(tmp_path)
    run_cli(["data", "convert", str(ds), str(tmp_path / "out"), "--kind", "pairs", "--prefix", prefix],
            expect="prefix", watch=[tmp_path])


@pytest.mark.parametrize("part", ["folder", "data.jsonl", "shards", "videos"])
@pytest.mark.parametrize("kind", ["pairs", "interleaved", "video"])
def test_shapes_refuses_an_existing_dataset_before_writing(tmp_path, kind, part):
    target = tmp_path / "ds"
    (target / "folder").mkdir(parents=True) if part == "folder" else target.mkdir()
    if part == "folder":
        (target / "folder" / "00000.png").write_bytes(b"an earlier dataset")
    elif part == "data.jsonl":
        (target / part).write_text('{"image": "folder/00000.png", "caption": "earlier"}\n')
    else:
        (target / part).mkdir()
        (target / part / "keep").write_text("earlier")
    run_cli(["data", "shapes", str(target), "--kind", kind, "--n", "2"],
            expect=[str(target), part, "--overwrite"], watch=[tmp_path])


@pytest.mark.parametrize("part", ["data.yaml", "train2014", "test_questions.json"])
def test_shapes_vqa_refuses_an_existing_dataset_before_writing(tmp_path, part):
    target = tmp_path / "ds"
    target.mkdir()
    (target / part).mkdir() if "." not in part else (target / part).write_text("earlier")
    run_cli(["data", "shapes", str(target), "--kind", "vqa", "--n", "4"], expect=[str(target), part, "--overwrite"],
            watch=[tmp_path])


def test_shapes_refuses_an_output_that_is_a_file(tmp_path):
    (tmp_path / "ds").write_text("a file")
    run_cli(["data", "shapes", str(tmp_path / "ds"), "--kind", "pairs", "--overwrite"],
            expect=[str(tmp_path / "ds"), "not a folder"], watch=[tmp_path])


CONVERT_OUTS = {
    "saved-model": ({CONFIG_FILE: "lm: {}\n", WEIGHTS_FILE: "old"}, [], ["already exists", "--overwrite"]),
    "weights-only": ({WEIGHTS_FILE: "old"}, [], ["already exists", "--overwrite"]),
    "other-files": ({"notes.txt": "mine"}, [], ["already exists", "--overwrite"]),
    "other-files-overwrite": ({"notes.txt": "mine"}, ["--overwrite"], ["holds none of", "refusing"]),
}


@pytest.mark.parametrize("files, extra, expect", CONVERT_OUTS.values(), ids=CONVERT_OUTS.keys())
def test_convert_openflamingo_checks_out_before_any_work(tmp_path, files, extra, expect):
    """The checkpoint does not even exist: the output is checked first."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    config = tmp_path / "config.yaml"
    config.write_text("lm: {name_or_path: some/lm}\n")
    run_cli(["convert-openflamingo", str(tmp_path / "missing.pt"), "--config", str(config), "--out", str(out),
             *extra], expect=[str(out), *expect], watch=[tmp_path])


def test_convert_openflamingo_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    config = tmp_path / "config.yaml"
    config.write_text("lm: {name_or_path: some/lm}\n")
    run_cli(["convert-openflamingo", str(tmp_path / "missing.pt"), "--config", str(config), "--out",
             str(tmp_path / "out"), "--overwrite"], expect=[str(tmp_path / "out"), "not a folder"],
            watch=[tmp_path])


@pytest.fixture(scope="module")
def tiny_model(lm_dir):
    from conftest import build_tiny

    return build_tiny(lm_dir("llama"))


@pytest.mark.parametrize("files, overwrite, expect", [
    ({CONFIG_FILE: "x"}, False, "--overwrite"),
    ({"notes.txt": "mine"}, False, "--overwrite"),
    ({"notes.txt": "mine"}, True, "holds none of"),
])
def test_save_pretrained_refuses_existing_folders(tmp_path, tiny_model, files, overwrite, expect):
    from flamingo.model.weights import save_pretrained

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expect_user_error(lambda: save_pretrained(tiny_model, tmp_path, overwrite=overwrite), expect=[str(tmp_path), expect],
                      watch=[tmp_path])


def test_api_convert_and_shapes_refuse_existing_outputs(tmp_path):
    from flamingo.data import make_shapes_dataset
    from flamingo.data.convert import convert_to_shards

    ds = small_pairs(tmp_path)
    convert_to_shards(str(ds), tmp_path / "out", "pairs")
    make_shapes_dataset(tmp_path / "shapes", 2)
    expect_user_error(lambda: convert_to_shards(str(ds), tmp_path / "out", "pairs"), expect="--overwrite",
                      watch=[tmp_path])
    expect_user_error(lambda: make_shapes_dataset(tmp_path / "shapes", 3), expect="--overwrite", watch=[tmp_path])


# ------------------------------------------------------------- configs that ask for remote code
@pytest.fixture
def code_marker(tmp_path, monkeypatch):
    """Where the remote-code LM's code would write if it ran (inside the watched folder)."""
    monkeypatch.setenv("FLAMINGO_TEST_CODE_RAN", str(tmp_path / "code-ran"))
    return tmp_path / "code-ran"


def remote_config(tmp_path: Path, lm_path: Path, clip_dir: Path, form: str) -> Path:
    """A model spec whose config asks for lm.trust_remote_code: a YAML/JSON config or a saved dir."""
    config = tiny_config(lm_path, **{"lm.trust_remote_code": True})
    config.vision.name_or_path = str(clip_dir)
    if form == "dir":
        saved = tmp_path / "model"
        saved.mkdir()
        config.save(saved / CONFIG_FILE)
        (saved / WEIGHTS_FILE).write_bytes(b"never read")
        return saved
    path = tmp_path / f"model.{form}"
    config.save(path)
    return path


REMOTE_COMMANDS = {
    "generate": lambda spec: ["generate", "--model", spec, "--prompt", "Hello"],
    "chat": lambda spec: ["chat", "--model", spec],
    "params": lambda spec: ["params", spec],
    "eval-procedural": lambda spec: ["eval-procedural", "--model", spec, "--shots", "0", "--seeds", "1",
                                     "--episodes", "1"],
    "serve": lambda spec: ["serve", "--model", spec, "--port", "1"],  # refused before anything listens
}


@pytest.mark.parametrize("lm", ["with-code", "plain"])
@pytest.mark.parametrize("form", ["dir", "yaml", "json"])
@pytest.mark.parametrize("command", REMOTE_COMMANDS.values(), ids=REMOTE_COMMANDS.keys())
def test_commands_refuse_remote_code_without_the_flag(tmp_path, remote_code_lm_dir, lm_dir, clip_dir, code_marker,
                                                      command, form, lm):
    spec = remote_config(tmp_path, remote_code_lm_dir if lm == "with-code" else lm_dir("llama"), clip_dir, form)
    run_cli(command(str(spec)), expect=["lm.trust_remote_code", "--trust-remote-code"], watch=[tmp_path], stdin="")


@pytest.mark.parametrize("lm", ["with-code", "plain"])
def test_train_refuses_remote_code_without_the_flag(tmp_path, remote_code_lm_dir, lm_dir, clip_dir, code_marker, lm):
    data = tiny_train_dict(remote_code_lm_dir if lm == "with-code" else lm_dir("llama"), clip_dir, tmp_path / "run")
    data["model"]["lm"]["trust_remote_code"] = True
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(data))
    run_cli(["train", str(tmp_path / "train.yaml")], expect=["lm.trust_remote_code", "--trust-remote-code"],
            watch=[tmp_path])


@pytest.mark.parametrize("lm", ["with-code", "plain"])
def test_convert_openflamingo_refuses_remote_code_without_the_flag(tmp_path, remote_code_lm_dir, lm_dir, clip_dir,
                                                                   code_marker, lm):
    spec = remote_config(tmp_path, remote_code_lm_dir if lm == "with-code" else lm_dir("llama"), clip_dir, "yaml")
    torch.save({"model_state_dict": {"perceiver.latents": torch.zeros(2)}}, tmp_path / "checkpoint.pt")
    run_cli(["convert-openflamingo", str(tmp_path / "checkpoint.pt"), "--config", str(spec), "--out",
             str(tmp_path / "out")], expect=["lm.trust_remote_code", "--trust-remote-code"], watch=[tmp_path])


def test_a_hub_model_asking_for_remote_code_is_refused(tmp_path, remote_code_lm_dir, clip_dir, code_marker,
                                                       monkeypatch):
    """`--model org/name`: the config fetched from the hub decides nothing."""
    import huggingface_hub

    fetched = remote_config(tmp_path, remote_code_lm_dir, clip_dir, "dir")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(fetched))
    run_cli(["generate", "--model", "evil/flamingo", "--prompt", "Hello"],
            expect=["lm.trust_remote_code", "--trust-remote-code"], watch=[tmp_path])
    from flamingo.model.weights import load_model

    expect_user_error(lambda: load_model("evil/flamingo"), expect=["lm.trust_remote_code", "trust_remote_code=True"],
                      watch=[tmp_path])


@pytest.mark.parametrize("tokenizer", ["with the LM", "elsewhere"])
def test_an_lm_needing_its_own_code_under_a_config_without_remote_code(tmp_path, remote_code_lm_dir, lm_dir,
                                                                       clip_dir, code_marker, tokenizer):
    """lm.trust_remote_code: false, but the LM's files need their code (transformers refuses with a
    plain ValueError): one line naming the field and the flag; the code never runs."""
    config = tiny_config(remote_code_lm_dir)
    config.vision.name_or_path = str(clip_dir)
    if tokenizer == "elsewhere":
        config.lm.tokenizer = str(lm_dir("llama"))
    config.save(tmp_path / "model.yaml")
    run_cli(["generate", "--model", str(tmp_path / "model.yaml"), "--prompt", "Hello"],
            expect=["lm.name_or_path", "lm.trust_remote_code: true", "--trust-remote-code"], watch=[tmp_path])
    assert not code_marker.exists()


def _remote_api_calls():
    from flamingo import FlamingoConfig
    from flamingo.model.convert_openflamingo import convert_openflamingo
    from flamingo.model.weights import build_flamingo, load_model, load_pretrained
    from flamingo.training.trainer import train

    def trained(spec: Path):
        from test_training import make_config

        data = tiny_train_dict("unused", "unused", spec.parent / "run")
        data["model"] = FlamingoConfig.load(spec).to_dict()
        return train(make_config(data))

    return {
        "load_model-dir": ("dir", lambda spec: load_model(spec)),
        "load_model-yaml": ("yaml", lambda spec: load_model(spec)),
        "load_model-json": ("json", lambda spec: load_model(str(spec))),
        "load_pretrained": ("dir", lambda spec: load_pretrained(spec)),
        "build_flamingo": ("yaml", lambda spec: build_flamingo(FlamingoConfig.load(spec))),
        "convert_openflamingo": ("yaml", lambda spec: convert_openflamingo(
            spec.parent / "checkpoint.pt", FlamingoConfig.load(spec), spec.parent / "out")),
        "train": ("yaml", trained),
    }


REMOTE_API = list(_remote_api_calls())


@pytest.mark.parametrize("lm", ["with-code", "plain"])
@pytest.mark.parametrize("name", REMOTE_API)
def test_api_refuses_remote_code_without_trust_remote_code(tmp_path, remote_code_lm_dir, lm_dir, clip_dir,
                                                           code_marker, name, lm):
    form, call = _remote_api_calls()[name]
    spec = remote_config(tmp_path, remote_code_lm_dir if lm == "with-code" else lm_dir("llama"), clip_dir, form)
    torch.save({"w": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    expect_user_error(lambda: call(spec), expect=["lm.trust_remote_code", "trust_remote_code=True"],
                      watch=[tmp_path])


@pytest.mark.parametrize("files, extra, expect", list(CONVERT_OUTS.values())[:3], ids=list(CONVERT_OUTS)[:3])
def test_wise_ft_refuses_an_existing_out(tmp_path, trained_run, files, extra, expect):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    model = str(trained_run[0])
    run_cli(["wise-ft", model, model, "--alpha", "0.5", "--out", str(out), *extra], expect=[str(out), *expect],
            watch=[tmp_path])


# ------------------------------------------------------------------------ damaged checkpoints
class NotATensor:
    pass


def _tamper(folder: Path, how: str) -> None:
    state, bridge = folder / "state.pt", folder / WEIGHTS_FILE
    if how == "no-state":
        state.unlink()
    elif how == "no-weights":
        bridge.unlink()
    elif how == "state-truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif how == "state-text":
        state.write_text("not a torch file")
    elif how == "state-empty":
        state.write_bytes(b"")
    elif how == "state-pickled-object":
        torch.save({"format": "flamingo-train-checkpoint-v1", "payload": NotATensor()}, state)
    elif how == "state-other-format":
        torch.save({"format": "something-else", "step": 3}, state)
    elif how == "state-a-list":
        torch.save([1, 2, 3], state)
    elif how == "weights-truncated":
        bridge.write_bytes(bridge.read_bytes()[:64])
    elif how == "weights-text":
        bridge.write_text("not safetensors")
    elif how == "weights-huge-header":
        bridge.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    elif how == "state-is-a-folder":
        state.unlink()
        state.mkdir()
    else:
        raise AssertionError(how)


CHECKPOINT_DAMAGE = ["no-state", "no-weights", "state-truncated", "state-text", "state-empty", "state-pickled-object",
                     "state-other-format", "state-a-list", "weights-truncated", "weights-text", "weights-huge-header",
                     "state-is-a-folder"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, lm_dir, clip_dir):
    """A finished 2-step run with a checkpoint at step 2 (copied by each case before damaging it)."""
    from test_training import make_config

    from flamingo.training.trainer import train

    root = tmp_path_factory.mktemp("run")
    data = tiny_train_dict(lm_dir("llama"), clip_dir, root / "run", steps=2, checkpoint={"every": 2, "keep": 1})
    train(make_config(data))
    return root / "run" / "checkpoints" / "step-00000002", data


@pytest.mark.parametrize("how", CHECKPOINT_DAMAGE)
def test_damaged_training_checkpoints_are_refused_on_load(tmp_path, trained_run, how):
    import shutil

    from flamingo.training.checkpoint import load_checkpoint

    folder = tmp_path / "step-00000002"
    shutil.copytree(trained_run[0], folder)
    _tamper(folder, how)
    expect_user_error(lambda: load_checkpoint(folder), expect=str(folder), watch=[tmp_path])


@pytest.mark.parametrize("how", ["state-text", "weights-truncated", "no-state"])
def test_train_resume_from_a_damaged_checkpoint(tmp_path, trained_run, how):
    import shutil

    folder = tmp_path / "step-00000002"
    shutil.copytree(trained_run[0], folder)
    _tamper(folder, how)
    data = dict(trained_run[1], run_dir=str(tmp_path / "run"), steps=3)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(data))
    run_cli(["train", str(tmp_path / "train.yaml"), "--resume", str(folder)], expect=str(folder),
            watch=[tmp_path], allowed=[tmp_path / "run"])


MODEL_DAMAGE = {
    "no-weights": lambda d: (d / WEIGHTS_FILE).unlink(),
    "weights-empty": lambda d: (d / WEIGHTS_FILE).write_bytes(b""),
    "weights-text": lambda d: (d / WEIGHTS_FILE).write_text("not safetensors"),
    "weights-truncated": lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:200]),
    "weights-other-keys": lambda d: save_file({"something.else": torch.zeros(2)}, str(d / WEIGHTS_FILE)),
    "weights-mis-shaped": lambda d: save_file(
        {k: torch.zeros(1) for k in _saved_keys(d)}, str(d / WEIGHTS_FILE)),
    "weights-is-a-folder": lambda d: ((d / WEIGHTS_FILE).unlink(), (d / WEIGHTS_FILE).mkdir()),
    "config-a-list": lambda d: (d / CONFIG_FILE).write_text("- 1\n- 2\n"),
    "config-unknown-field": lambda d: (d / CONFIG_FILE).write_text((d / CONFIG_FILE).read_text() + "colour: red\n"),
    "config-bad-value": lambda d: (d / CONFIG_FILE).write_text(
        (d / CONFIG_FILE).read_text().replace("depth: 2", "depth: -3")),
    "no-config": lambda d: (d / CONFIG_FILE).unlink(),
}


def _saved_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", MODEL_DAMAGE)
def test_damaged_model_directories_are_refused(tmp_path, trained_run, name):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(trained_run[0], folder)
    os.remove(folder / "state.pt")
    MODEL_DAMAGE[name](folder)
    field = {"config-unknown-field": "colour", "config-bad-value": "perceiver.depth"}.get(name)
    run_cli(["params", str(folder)], expect=field or str(folder), watch=[tmp_path])
