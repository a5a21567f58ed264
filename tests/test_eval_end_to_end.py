"""The suite end to end on a tiny model and tiny datasets in the official formats: captioning,
VQA, classification and video tasks, outputs, resumption after an interruption, missing images,
rank slices, and the `flamingo eval` command (including its bad-input errors)."""

from __future__ import annotations

import json
import shutil

import pytest

import eval_fixtures as F
from flamingo.cli import main
from flamingo.evaluation import EvalSettings, evaluate, load_data_config
from flamingo.evaluation.records import RecordWriter, merge_shards, read_all
from flamingo.evaluation.runner import TaskEvaluator
from flamingo.evaluation.suite import load_subsets
from flamingo.data.benchmarks.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    tasks = {"coco": (root / "coco", F.write_karpathy(root / "coco", train=8, test=4)),
             "vqav2": (root / "vqa", F.write_vqa(root / "vqa", train=8, test=4)),
             "hatefulmemes": (root / "hm", F.write_hateful_memes(root / "hm", n=10)),
             "imagenet": (root / "in", F.write_imagenet(root / "in")),
             "msrvttqa": (root / "vid", F.write_video_qa(root / "vid", train=4, test=3)),
             "kinetics700": (root / "kin", F.write_kinetics(root / "kin"))}
    F.write_data_config(root / "data.yaml", tasks)
    return root


def _settings(**kw) -> EvalSettings:
    base = dict(shots=[0, 2], trials=1, support_size=4, batch_size=2, max_new_tokens=4, video_frames=2,
                video_fps=2.0)
    return EvalSettings(**{**base, **kw})


def test_every_task_type_end_to_end_with_outputs(model, data_dir, tmp_path):
    data = load_data_config(data_dir / "data.yaml")
    tasks = ["coco", "vqav2", "hatefulmemes", "imagenet", "msrvttqa", "kinetics700"]
    results = evaluate(model, tasks, data, _settings(trials=2, shots=[0, 2]), tmp_path, model_name="tiny",
                       progress=False)
    for name in tasks:
        task = results["tasks"][name]
        for shots in ("0", "2"):
            cell = task["shots"][shots]
            assert len(cell["trials"]) == 2 and all(t["ok"] == task["queries"] for t in cell["trials"])
            assert 0 <= cell["mean"][task["metric"]] <= 100
            assert all(len(t["demo_ids"]) == 2 for t in cell["trials"])  # zero-shot: two text-only examples
        lines = (tmp_path / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 2 * 2 * task["queries"]
    record = json.loads((tmp_path / "predictions" / "vqav2.jsonl").read_text().splitlines()[0])
    assert {"generation", "prediction"} <= set(record)
    record = json.loads((tmp_path / "predictions" / "imagenet.jsonl").read_text().splitlines()[0])
    assert sorted(record["ranked"]) == ["blue square", "green triangle", "red circle"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["shots"] == [0, 2] and saved["settings"]["seed"] == 0 and saved["model"] == "tiny"
    assert saved["tasks"]["coco"]["shots"]["2"]["trials"][0]["seed_keys"] == [0, "coco", "demos", 2, 0]
    table = (tmp_path / "results.md").read_text()
    assert "| coco | CIDEr |" in table and "| kinetics700 | top-1 |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_rices_run(model, data_dir, tmp_path):
    data = load_data_config(data_dir / "data.yaml")
    results = evaluate(model, ["vqav2"], data, _settings(shots=[2], rices=True, trials=3), tmp_path / "out",
                       cache_dir=tmp_path / "cache", progress=False)
    cell = results["tasks"]["vqav2"]["shots"]["2"]
    assert len(cell["trials"]) == 1 and cell["trials"][0]["ok"] == 4  # deterministic: one trial
    assert list((tmp_path / "cache").glob("*-vqav2-test.safetensors"))


def test_resumption_after_interruption_gives_identical_results(model, data_dir, tmp_path, monkeypatch):
    data = load_data_config(data_dir / "data.yaml")
    settings = _settings(shots=[0, 2], trials=2)
    full = evaluate(model, ["vqav2"], data, settings, tmp_path / "a", progress=False)
    reference = (tmp_path / "a" / "predictions" / "vqav2.jsonl").read_text()

    # Interrupted run: 5 of 16 records written, the 6th torn mid-line by the kill.
    (tmp_path / "b" / "predictions").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "run.json", tmp_path / "b" / "run.json")
    lines = reference.splitlines(keepends=True)
    (tmp_path / "b" / "predictions" / "vqav2.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    calls = []
    original = TaskEvaluator.run_batch
    monkeypatch.setattr(TaskEvaluator, "run_batch", lambda self, *a: calls.append(a[:2]) or original(self, *a))
    resumed = evaluate(model, ["vqav2"], data, settings, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "predictions" / "vqav2.jsonl").read_text() == reference
    assert resumed["tasks"] == full["tasks"]
    # 8 batches of 2 queries in all; the first two were complete and are not recomputed.
    assert len(calls) == 6


def test_resuming_with_other_settings_is_refused(model, data_dir, tmp_path):
    data = load_data_config(data_dir / "data.yaml")
    evaluate(model, ["hatefulmemes"], data, _settings(shots=[0]), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"run\.json: this output directory holds a run with different settings"):
        evaluate(model, ["hatefulmemes"], data, _settings(shots=[0], seed=1), tmp_path, progress=False)


def test_missing_image_is_counted_not_fatal(model, data_dir, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(data_dir / "coco", root)
    (root / "images" / "val2014" / "img9.jpg").unlink()  # a test query
    (root / "images" / "val2014" / "img0.jpg").unlink()  # a training image (maybe a support example)
    data = load_data_config(F.write_data_config(tmp_path / "d.yaml", {"coco": (root, {
        s: {"annotations": "karpathy.json", "media": "images"} for s in ("train", "test")})}))
    results = evaluate(model, ["coco"], data, _settings(shots=[2]), tmp_path / "out", progress=False)
    task = results["tasks"]["coco"]
    assert task["missing_media"]["count"] == 1 and task["missing_media"]["ids"] == ["9"]
    assert task["shots"]["2"]["trials"][0]["ok"] == 3 and "0" not in task["shots"]["2"]["trials"][0]["demo_ids"]
    record = next(json.loads(x) for x in (tmp_path / "out" / "predictions" / "coco.jsonl").read_text().splitlines()
                  if json.loads(x)["id"] == "9")
    assert record["status"] == "missing" and "img9.jpg does not exist" in record["message"]


def test_rank_slices_merge_into_the_single_process_records(model, data_dir, tmp_path):
    data = load_data_config(data_dir / "data.yaml")
    settings = _settings(shots=[2], batch_size=1)
    task = get_task("hatefulmemes")
    subsets = load_subsets(task, data, settings)
    for world, directory in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        for rank in range(world):
            writer = RecordWriter(directory, task.name, rank)
            TaskEvaluator(model, task, subsets, settings, rank=rank, world=world, progress=False).run(set(), writer)
            writer.close()
    assert len(list((tmp_path / "two").glob("*.jsonl"))) == 2
    merged = merge_shards(tmp_path / "two", task.name)
    assert merged == sorted(read_all(tmp_path / "one", task.name), key=lambda r: (r["shots"], r["trial"], r["id"]))
    assert [p.name for p in (tmp_path / "two").glob("*.jsonl")] == ["hatefulmemes.jsonl"]


# ---------------------------------------------------------------------------------- CLI
def test_cli_eval_runs_and_prints_the_table(model, data_dir, tmp_path, capsys):
    from flamingo.model.weights import save_pretrained

    saved = save_pretrained(model, tmp_path / "model")
    code = main(["eval", "--model", str(saved), "--task", "hatefulmemes", "--shots", "0,2", "--trials", "1",
                 "--support-size", "4", "--data", str(data_dir / "data.yaml"), "--out", str(tmp_path / "out"),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| hatefulmemes | ROC-AUC |" in out
    # ... and the table lands in the model directory's card, where the Hub shows it
    card = (saved / "README.md").read_text()
    assert f"results recorded in the model card {saved / 'README.md'}" in out
    assert "| hatefulmemes | ROC-AUC |" in card and f"`{tmp_path / 'out'}`" in card


@pytest.mark.parametrize("args, message", [
    (["--task", "cocoa"], "unknown task 'cocoa'"),
    (["--task", "okvqa"], "tasks: no entry for task 'okvqa'"),
    (["--task", "coco", "--data", "MISSING"], "data config file MISSING does not exist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(data_dir, tmp_path, capsys, args, message):
    argv = ["eval", "--model", "unused", "--data", str(data_dir / "data.yaml"), "--out", str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flamingo eval: error: ") and message in err and err.count("\n") == 1


def test_cli_missing_annotation_file_names_it(model, tmp_path, capsys):
    from flamingo.model.weights import save_pretrained

    (tmp_path / "d.yaml").write_text("tasks:\n  coco:\n    test: {annotations: nowhere.json, media: img}\n")
    saved = save_pretrained(model, tmp_path / "model")
    assert main(["eval", "--model", str(saved), "--task", "coco", "--data", str(tmp_path / "d.yaml"),
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nowhere.json'}: Karpathy split file does not exist" in capsys.readouterr().err
