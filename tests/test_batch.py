"""`flamingo batch`: a dataset of prompts through the serving engine gives the server's answers,
record for record; bad records are rejected with their reason, never fatal; a run stopped midway
resumes with every id exactly once; the output appears only when complete; Ray Data gives the
same results as one process."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import solid_image
from starlette.testclient import TestClient

from flamingo.cli import main
from flamingo.errors import MissingExtra
from flamingo.inference import generate_text, text_prompt
from flamingo.serving.app import create_app
from flamingo.serving.batch import BatchDefaults, BatchOutput, run_batch
from flamingo.serving.batch.records import data_url, open_dataset
from flamingo.serving.batch.runner import batch_limits
from flamingo.serving.engine import Engine, EngineConfig
from flamingo.serving.limits import ServerSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLOURS = ("red", "blue", "green", "yellow", "purple", "grey")
SUPPORT = "<image>Output: a red square.<|endofchunk|><image>Output: a blue circle.<|endofchunk|>"


def png_bytes(colour: str) -> bytes:
    import io

    buffer = io.BytesIO()
    solid_image(colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for colour in COLOURS:
        (folder / f"{colour}.png").write_bytes(png_bytes(colour))
    return folder


def few_shot_records(count: int) -> list[dict]:
    """Few-shot records over one support set (its images as paths), a query image each."""
    return [{"id": f"q{i}", "prompt": SUPPORT + "<image>Output:",
             "images": ["img/red.png", "img/blue.png", f"img/{COLOURS[i % len(COLOURS)]}.png"], "max_tokens": 4 + i % 3}
            for i in range(count)]


def write_jsonl(path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(path) -> dict:
    return {r["id"]: r for r in read_jsonl(path)}


def test_batch_answers_equal_the_servers(model, tmp_path, images):
    chat = {"id": 7, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "img/green.png"}}, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 5}
    records = few_shot_records(4) + [
        {"id": "text-only", "prompt": "the quick brown fox", "max_tokens": 5, "stop": ["e"]},
        {"id": "beams", "prompt": "<image>An image of", "images": ["img/grey.png"], "max_tokens": 4, "beams": 2,
         "n": 2},
        {"id": "sampled", "prompt": "<image>This is a", "images": [data_url(png_bytes("purple"))], "max_tokens": 4,
         "temperature": 0.8, "seed": 3, "n": 2},
        chat]
    write_jsonl(tmp_path / "in.jsonl", records)
    summary = run_batch(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False,
                        engine_config=EngineConfig(max_queue=8, max_running=4, prefill_chunk=2))
    assert (summary.written, summary.rejected, summary.earlier) == (len(records), 0, 0)
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.rejects.jsonl").exists()
    results = by_id(tmp_path / "out.jsonl")
    assert sorted(results, key=str) == sorted((r["id"] for r in records), key=str)

    settings = ServerSettings(model_name="tiny", allowed_local_media_path=tmp_path)
    with TestClient(create_app(Engine(model), settings)) as client:
        for record in records:
            body = {k: v for k, v in record.items() if k != "id"}
            body["num_beams"] = body.pop("beams", 1)
            chat_request = "messages" in body
            answer = client.post("/v1/chat/completions" if chat_request else "/v1/completions", json=body).json()
            texts = [c["message"]["content"] if chat_request else c["text"] for c in answer["choices"]]
            result = results[record["id"]]
            assert [c["text"] for c in result["choices"]] == texts, record["id"]
            assert [c["finish_reason"] for c in result["choices"]] == [c["finish_reason"] for c in answer["choices"]]
            assert result["text"] == texts[0] and result["usage"] == answer["usage"], record["id"]
    # and the library's own answer (what a user writes today)
    expected = generate_text(model, text_prompt(SUPPORT + "<image>Output:", [solid_image(c) for c in
                                                                              ("red", "blue", "red")]),
                             max_new_tokens=4)
    assert results["q0"]["text"] == expected


def test_bad_records_are_rejected_with_their_reason_and_the_rest_runs(model, tmp_path, images):
    good = few_shot_records(2)
    lines = [good[0],
             '{"id": "torn", "prompt": ',  # not JSON
             {"id": "missing-image", "prompt": "<image>Output:", "images": ["img/nowhere.png"]},
             {"id": "placeholders", "prompt": "<image><image>Output:", "images": ["img/red.png"]},
             {"prompt": "<image>Output:", "images": ["img/red.png"]},  # no id
             {"id": "options", "prompt": "hello", "max_tokens": "ten"},
             {"id": "outside", "prompt": "<image>Output:", "images": ["../img/red.png"]},
             good[0],  # the same id again
             good[1]]
    write_jsonl(tmp_path / "in.jsonl", lines)
    summary = run_batch(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    assert (summary.written, summary.rejected) == (2, 7)
    assert sorted(by_id(tmp_path / "out.jsonl")) == ["q0", "q1"]
    rejects = read_jsonl(tmp_path / "out.rejects.jsonl")
    reasons = {(r["id"], r["where"]): r["reason"] for r in rejects}
    assert reasons[(None, "line 2")].startswith("not valid JSON")
    assert "no image file 'img/nowhere.png'" in reasons[("missing-image", "line 3")]
    assert reasons[("placeholders", "line 4")].startswith("images: the prompt has 2 <image> placeholder(s) but 1")
    assert reasons[(None, "line 5")].startswith("id: missing")
    assert reasons[("options", "line 6")].startswith("max_tokens: ")
    assert reasons[("outside", "line 7")].startswith("images[0]: the path may not contain '..'")
    assert reasons[("q0", "line 8")] == "id: 'q0' is the id of an earlier record too"

    # the rejected records are tried again by a rerun; fixed, they run and the rejects file goes
    write_jsonl(tmp_path / "in.jsonl", good)
    summary = run_batch(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    assert (summary.written, summary.earlier, summary.rejected) == (0, 2, 0)
    assert not (tmp_path / "out.rejects.jsonl").exists()


class Killed(Exception):
    pass


def test_a_run_stopped_midway_resumes_with_every_id_exactly_once(model, tmp_path, images, monkeypatch):
    records = few_shot_records(10) + [{"id": i, "prompt": "<image>An image of", "images": [f"img/{c}.png"],
                                       "max_tokens": 3} for i, c in enumerate(COLOURS)]
    write_jsonl(tmp_path / "in.jsonl", records)
    run_batch(model, tmp_path / "in.jsonl", tmp_path / "whole.jsonl", progress=False)
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"

    write = BatchOutput.write
    written = []

    def write_then_die(self, result):
        if len(written) == 5:
            raise Killed()
        written.append(result["id"])
        write(self, result)

    monkeypatch.setattr(BatchOutput, "write", write_then_die)
    config = EngineConfig(max_queue=4, max_running=2, prefill_chunk=2)
    with pytest.raises(Killed):
        run_batch(model, tmp_path / "in.jsonl", out, progress=False, engine_config=config)
    monkeypatch.setattr(BatchOutput, "write", write)
    assert not out.exists(), "a stopped run left an output that looks complete"
    assert [r["id"] for r in read_jsonl(partial)] == written
    with open(partial, "a") as f:  # killed while writing a line
        f.write('{"id": "q9", "text": " a bl')

    summary = run_batch(model, tmp_path / "in.jsonl", out, progress=False, engine_config=config)
    assert (summary.earlier, summary.written, summary.rejected) == (5, len(records) - 5, 0)
    assert out.exists() and not partial.exists()
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids, key=str) == sorted((r["id"] for r in records), key=str)  # each exactly once
    assert by_id(out) == by_id(tmp_path / "whole.jsonl")

    # a finished output: a rerun has nothing to do and leaves it as it was
    before = out.read_bytes()
    summary = run_batch(model, tmp_path / "in.jsonl", out, progress=False)
    assert (summary.earlier, summary.written) == (len(records), 0) and out.read_bytes() == before


def test_a_folder_of_images_with_a_few_shot_prompt(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for colour in COLOURS[:3]:
        (folder / f"{colour}.png").write_bytes(png_bytes(colour))
    (folder / "blue.json").write_text(json.dumps({"max_tokens": 2}))
    defaults = BatchDefaults(SUPPORT + "<image>Output:", (data_url(png_bytes("red")), data_url(png_bytes("blue"))))
    summary = run_batch(model, folder, tmp_path / "out.jsonl", defaults=defaults, progress=False,
                        settings=batch_limits(5))
    assert (summary.written, summary.rejected) == (3, 0)
    results = by_id(tmp_path / "out.jsonl")
    for colour in COLOURS[:3]:
        expected = generate_text(model, text_prompt(SUPPORT + "<image>Output:", [
            solid_image("red"), solid_image("blue"), solid_image(colour)]), max_new_tokens=2 if colour == "blue" else 5)
        assert results[colour]["text"] == expected, colour


def test_webdataset_shards_with_their_own_fields_or_the_default_prompt(model, tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as shard:
        shard.write({"__key__": "a", "png": png_bytes("green")})
        shard.write({"__key__": "b", "png": png_bytes("yellow"),
                     "json": json.dumps({"id": "own", "prompt": "<image>This is a", "max_tokens": 3}).encode()})
        shard.write({"__key__": "c", "txt": b"no image"})
    summary = run_batch(model, tmp_path / "shard-000.tar", tmp_path / "out.jsonl", progress=False,
                        defaults=BatchDefaults("<image>An image of"), settings=batch_limits(4))
    assert (summary.written, summary.rejected) == (2, 1)
    results = by_id(tmp_path / "out.jsonl")
    assert results["a"]["text"] == generate_text(model, text_prompt("<image>An image of", [solid_image("green")]),
                                                 max_new_tokens=4)
    assert results["own"]["text"] == generate_text(model, text_prompt("<image>This is a", [solid_image("yellow")]),
                                                   max_new_tokens=3)
    reject = read_jsonl(tmp_path / "out.rejects.jsonl")[0]
    assert reject["id"] == "c" and reject["reason"].startswith("images: the prompt has 1 <image> placeholder(s) but 0")


def test_the_command_refuses_bad_options_before_loading_a_model(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", few_shot_records(1))
    assert main(["batch", str(tmp_path / "nowhere.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--prompt-image", "x.png"]) == 2
    assert "--prompt-image x.png: no such file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "httpx", None)  # the serve extra is not installed
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == "flamingo batch needs the serve extra: pip install 'flamingo[serve]'"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "ray", None)  # the ray extra is not installed
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--ray"]) == 1
    assert capsys.readouterr().err.strip() == "flamingo batch --ray needs the ray extra: pip install 'flamingo[ray]'"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_ray_data_gives_the_single_process_results(model, tmp_path, images):
    ray = pytest.importorskip("ray")
    from flamingo.serving.batch.on_ray import RaySettings, run_batch_on_ray

    records = few_shot_records(6) + ['{"id": "torn"', {"id": "chat", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/red.png"}},
                                     {"type": "text", "text": "What is this?"}]}]}]
    write_jsonl(tmp_path / "in.jsonl", records)
    run_batch(model, tmp_path / "in.jsonl", tmp_path / "alone.jsonl", progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch_on_ray(model, open_dataset(tmp_path / "in.jsonl"), tmp_path / "ray.jsonl",
                                   RaySettings(actors=2, batch_size=4, parquet=tmp_path / "parquet"), progress=False)
    finally:
        ray.shutdown()
    assert (summary.written, summary.rejected) == (7, 1)
    assert by_id(tmp_path / "ray.jsonl") == by_id(tmp_path / "alone.jsonl")
    assert read_jsonl(tmp_path / "ray.rejects.jsonl")[0]["reason"].startswith("not valid JSON")
    assert list((tmp_path / "parquet").glob("*.parquet"))
