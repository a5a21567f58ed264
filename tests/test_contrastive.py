"""Contrastive vision-encoder pretraining (paper B.1.3): the loss against a hand-written CLIP loss,
2 processes (torchrun, gloo) against one process on the concatenated batch, exact resume, a
trained tower that a Flamingo config loads back, and held-out retrieval that beats chance."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training_processes import HANG_S, _env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [f"{a} {c} {s}" for a in ("a", "an") for c in ("red", "green", "blue", "yellow", "purple", "orange")
            for s in ("circle", "square", "triangle")] * 4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (no dropout: runs compare exactly) with a WordPiece tokenizer trained on
    the shapes captions."""
    from flamingo.training.contrastive import make_scratch_text_tower

    path = make_scratch_text_tower(tmp_path_factory.mktemp("bert"), CAPTIONS, hidden_size=32, layers=2, heads=2,
                                   vocab_size=120, max_tokens=32)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Training pairs and a held-out split of coloured shapes with captions ("a red circle")."""
    from flamingo.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root / "train", 96, seed=0, image_size=64), \
        make_shapes_dataset(root / "heldout", 48, seed=1, image_size=64)


def pretrain_dict(clip_dir, bert_dir, data_path, run_dir, **extra) -> dict:
    return {"vision": {"kind": "clip", "name_or_path": str(clip_dir)},
            "text": {"name_or_path": str(bert_dir), "max_tokens": 8},
            "datasets": [{"name": "shapes", "path": str(data_path), "batch_size": 8, "augment": False}],
            "run_dir": str(run_dir), "embed_dim": 16, "steps": 4, "device": "cpu", "threads": 1,
            "optim": {"lr": 1e-3}, "logging": {"every": 1, "progress_bar": False},
            "checkpoint": {"every": 2, "keep": 3}, **extra}


def make_pretrain_config(data: dict):
    from flamingo.training.contrastive_config import PretrainConfig

    return PretrainConfig.from_dict(data)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs" / "pretrain").glob("*.yaml"),
                                         *(ROOT / "configs" / "embedded").glob("pretrain-*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_pretrain_configs_load(path):
    from flamingo.training.contrastive_config import load_pretrain_config

    config = load_pretrain_config(path)
    assert config.datasets and config.steps >= 1


# ------------------------------------------------------------------------------------------ loss
def reference_clip_loss(images, texts, scale, smoothing):
    """The paper's loss written out: -log softmax of the diagonal, image->text plus text->image,
    with label smoothing spread over the whole row."""
    n = images.shape[0]
    total = 0.0
    for a, b in ((images, texts), (texts, images)):
        logits = scale * a @ b.T
        for i in range(n):
            log_probs = logits[i] - torch.logsumexp(logits[i], 0)
            target = torch.full((n,), smoothing / n)
            target[i] += 1 - smoothing
            total = total - (target * log_probs).sum() / n
    return total


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_equals_a_hand_written_clip_loss(smoothing):
    from flamingo.training.contrastive import contrastive_loss

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    out = contrastive_loss(images, texts, scale, label_smoothing=smoothing)
    expected = reference_clip_loss(images, texts, scale, smoothing)
    torch.testing.assert_close(out.loss, expected)
    # Matched pairs: both accuracies 1; the loss falls as the temperature falls.
    same = contrastive_loss(images, images, scale)
    assert same.image_to_text_accuracy == 1 and same.text_to_image_accuracy == 1
    assert contrastive_loss(images, images, scale * 2).loss < same.loss


# ------------------------------------------------------------------------------ distributed
WORKER = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from flamingo.training.contrastive import contrastive_loss
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))  # a shared 'tower'
scale = torch.nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
inputs = torch.randn(2 * world * 3, 6, dtype=torch.float64)  # the global batch, rows per rank
local = inputs.view(2, world, 3, 6)[:, rank]
embed = lambda x: torch.nn.functional.normalize(x @ weight, dim=-1)
out = contrastive_loss(embed(local[0]), embed(local[1]), scale, 0.1, rank, world)
out.loss.backward()
for p in (weight, scale):  # what DDP does: average over ranks
    dist.all_reduce(p.grad); p.grad /= world
loss = out.loss.detach().clone(); dist.all_reduce(loss); loss /= world
save_file({"loss": loss, "weight": weight.grad, "scale": scale.grad}, sys.argv[1] + f"/rank{rank}.safetensors")
# A rank leaving while its peer still holds the gloo connection can abort the peer (SIGABRT).
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    """The gathered local loss under torchrun (2 ranks, gloo): loss and gradients == one process
    over both ranks' pairs."""
    from safetensors.torch import load_file

    from flamingo.training.contrastive import contrastive_loss

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    scale = torch.nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
    inputs = torch.randn(2 * 2 * 3, 6, dtype=torch.float64).view(2, 6, 6)

    def embed(x):
        return torch.nn.functional.normalize(x @ weight, dim=-1)

    out = contrastive_loss(embed(inputs[0]), embed(inputs[1]), scale, 0.1)
    out.loss.backward()
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(got["loss"], out.loss.detach())
        torch.testing.assert_close(got["weight"], weight.grad)
        torch.testing.assert_close(got["scale"], scale.grad)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _torchrun_pretrain(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    """`flamingo pretrain-vision` on the config `data` under torchrun with 2 ranks; it must succeed."""
    config_path = tmp_path / "pretrain.yaml"
    config_path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "flamingo.training", "pretrain-vision", str(config_path)],
                          env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_pretraining_matches_one_process_with_the_global_batch(tmp_path, clip_dir, bert_dir, shapes):
    """`torchrun -m flamingo.training pretrain-vision` with 2 ranks x 4 pairs == 1 process x 8:
    the same losses, gradient norms and trained weights."""
    from safetensors.torch import load_file

    from flamingo.training.contrastive import MODEL_FILE, pretrain_vision

    train, _ = shapes
    # Unshuffled, the sample-level split of a JSONL file (rank r reads records r, r+2, ...) gives
    # the two ranks together exactly the single process's records.
    data = pretrain_dict(clip_dir, bert_dir, train.jsonl, tmp_path / "multi", steps=2)
    data["datasets"][0].update(batch_size=4, shuffle=False)
    # Adam's first update is ~lr * sign(grad): a key-projection bias, whose true gradient is 0
    # (softmax ignores it), would turn rounding noise into a full step; eps keeps it small.
    data["optim"]["eps"] = 1e-6
    _torchrun_pretrain(tmp_path, data)
    single = dict(data, run_dir=str(tmp_path / "single"), datasets=[dict(data["datasets"][0], batch_size=8)])
    reference = pretrain_vision(make_pretrain_config(single))
    multi = _metrics(tmp_path / "multi")
    assert [r["step"] for r in multi] == [1, 2]
    assert [r["loss"] for r in multi] == pytest.approx([r["loss"] for r in reference.records], rel=1e-5)
    assert [r["grad_norm"] for r in multi] == pytest.approx([r["grad_norm"] for r in reference.records], rel=1e-4)
    got = load_file(str(tmp_path / "multi" / "checkpoints" / "step-00000002" / MODEL_FILE))
    expected = load_file(str(tmp_path / "single" / "checkpoints" / "step-00000002" / MODEL_FILE))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_stops_together_when_one_rank_runs_out_of_data_first(tmp_path, clip_dir, bert_dir):
    """3 shards x 8 pairs over 2 ranks, one epoch, batch 4: rank 0 holds 4 batches, rank 1 only 2.
    Both ranks stop after update 2 (rank 1 used to stop alone while rank 0 waited for it in the
    forward pass's collectives until the timeout)."""
    from flamingo.data.shapes import make_shapes_dataset

    shards = make_shapes_dataset(tmp_path / "data", 24, seed=0, shard_size=8).shards
    data = pretrain_dict(clip_dir, bert_dir, shards, tmp_path / "run", steps=50,
                         checkpoint={"every": 100, "keep": 1}, distributed={"timeout_minutes": 5})
    data["datasets"][0].update(batch_size=4, epochs=1, shuffle=False)
    done = _torchrun_pretrain(tmp_path, data)
    assert "a dataset ran out of data after 2 updates" in done.stderr
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir() and (tmp_path / "run" / "vision").is_dir()


# ------------------------------------------------------------------------- runs and outputs
def test_resumed_run_is_bit_exact_and_the_tower_loads_as_a_flamingo_vision_encoder(tmp_path, clip_dir, bert_dir,
                                                                                   shapes, lm_dir):
    from safetensors.torch import load_file

    from conftest import tiny_config
    from flamingo.model.vision import build_vision_encoder
    from flamingo.model.weights import build_flamingo
    from flamingo.training.contrastive import MODEL_FILE, pretrain_vision

    train, _ = shapes
    data = pretrain_dict(clip_dir, bert_dir, train.shards, tmp_path / "full", steps=4,
                         datasets=[{"name": "shapes", "path": train.shards, "batch_size": 8}])  # augmented
    full = pretrain_vision(make_pretrain_config(data))
    assert [r["step"] for r in full.records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 0 < r["temperature"] < 1 for r in full.records)
    resumed = pretrain_vision(make_pretrain_config(dict(data, run_dir=str(tmp_path / "resumed"))),
                              resume=tmp_path / "full" / "checkpoints" / "step-00000002")
    assert [r["step"] for r in resumed.records] == [3, 4]
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in full.records[2:]]
    expected = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / MODEL_FILE))
    got = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / MODEL_FILE))
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []

    # The trained tower as Flamingo's frozen vision encoder: kind local, same features.
    config = tiny_config(lm_dir("llama"))
    config.vision.kind, config.vision.name_or_path = "local", str(full.vision_dir)
    config.validate()
    encoder = build_vision_encoder(config.vision)
    pixels = torch.randn(1, 2, 1, 3, 32, 32)
    trained = full.model.vision.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), trained.encode(pixels.flatten(0, 2)).view(1, 2, 1, -1, 24))
    assert not any(p.requires_grad for p in encoder.parameters())
    flamingo = build_flamingo(config)
    assert flamingo.vision_encoder.feature_dim == 24
    assert torch.equal(flamingo.vision_encoder(pixels), encoder(pixels))
    # A higher resolution for the bridge training than for the pretraining (as in the paper).
    config.vision.image_size = 48
    assert build_vision_encoder(config.vision)(torch.randn(1, 1, 1, 3, 48, 48)).shape == (1, 1, 1, 36, 24)


def test_a_signal_between_checkpoints_stops_with_a_checkpoint_and_resumes_bit_exact(tmp_path, clip_dir, bert_dir,
                                                                                    shapes, monkeypatch, capsys):
    """SIGTERM during update 3 of a run checkpointing every 2 (through the CLI): exit 128 + 15
    after update 3 with its checkpoint and no tower; the resumed run ends with the weights of a
    run never stopped."""
    import signal

    from safetensors.torch import load_file

    from flamingo.cli import main
    from flamingo.training import contrastive
    from flamingo.training.contrastive import MODEL_FILE, pretrain_vision

    data = pretrain_dict(clip_dir, bert_dir, shapes[0].shards, tmp_path / "stopped", steps=5)
    reference = pretrain_vision(make_pretrain_config(dict(data, run_dir=str(tmp_path / "reference"))))
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(data))
    loss, calls = contrastive.contrastive_loss, []

    def loss_with_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return loss(*args, **kwargs)

    monkeypatch.setattr(contrastive, "contrastive_loss", loss_with_signal)
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain-vision", str(path)])
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-00000002",
                                                                                         "step-00000003"]
    assert not (tmp_path / "stopped" / contrastive.VISION_DIR).exists()

    resumed = pretrain_vision(make_pretrain_config(data), resume="auto")
    assert [r["step"] for r in resumed.records] == [4, 5]
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in reference.records[3:]]
    expected = load_file(str(tmp_path / "reference" / "checkpoints" / "step-00000005" / MODEL_FILE))
    got = load_file(str(tmp_path / "stopped" / "checkpoints" / "step-00000005" / MODEL_FILE))
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert resumed.vision_dir is not None and resumed.interrupted_by is None


def test_a_finite_dataset_ends_the_run_with_a_checkpoint_and_the_tower(tmp_path, clip_dir, bert_dir, shapes):
    from flamingo.training.contrastive import pretrain_vision

    data = pretrain_dict(clip_dir, bert_dir, shapes[0].jsonl, tmp_path / "run", steps=50,
                         checkpoint={"every": 100, "keep": 1})
    data["datasets"][0].update(epochs=1, batch_size=40, drop_last=True)  # 96 pairs: 2 updates
    result = pretrain_vision(make_pretrain_config(data))
    assert result.step == 2 and result.stopped_early == "a dataset ran out of data after 2 updates"
    assert result.last_checkpoint.name == "step-00000002" and result.vision_dir.is_dir()


def test_heldout_retrieval_rises_above_chance(tmp_path, clip_dir, bert_dir, shapes):
    from flamingo.training.contrastive import pretrain_vision

    train, heldout = shapes
    data = pretrain_dict(clip_dir, bert_dir, train.jsonl, tmp_path / "run", steps=40,
                         heldout={"path": str(heldout.jsonl), "every": 40, "batch_size": 48},
                         checkpoint={"every": 1000, "keep": 1}, logging={"every": 10, "progress_bar": False})
    data["datasets"][0]["batch_size"] = 16
    data["optim"]["lr"] = 3e-3
    result = pretrain_vision(make_pretrain_config(data))
    scores = [r["heldout"] for r in result.records if "heldout" in r]
    assert len(scores) == 1 and scores[0]["pairs"] == 48
    print(scores)
    assert scores[0]["i2t_recall"] > 2 * scores[0]["chance"] and scores[0]["t2i_recall"] > 2 * scores[0]["chance"]


def test_cli_prints_the_resolved_config_and_rejects_bad_fields(tmp_path, capsys, clip_dir, bert_dir, shapes):
    from flamingo.cli import main

    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(pretrain_dict(clip_dir, bert_dir, shapes[0].jsonl, tmp_path / "run")))
    assert main(["pretrain-vision", str(path), "--print-config", "label_smoothing=0.2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["label_smoothing"] == 0.2 and printed["optim"]["no_decay"] == ["logit_scale"]
    assert printed["optim"]["lr"] == 1e-3 and printed["schedule"]["kind"] == "linear"
    for override, field in (("datasets.0.batch_size=1", "datasets.0.batch_size"), ("vision.kind=vit", "vision.kind"),
                            ("max_logit_scale=5", "max_logit_scale"), (f"steps={10**30}", "steps"),
                            (f"embed_dim={10**9}", "embed_dim"), (f"datasets.0.batch_size={10**6}", "batch_size"),
                            ("threads=100000", "threads"), ("text.max_tokens=64", "text tower's 32 positions")):
        assert main(["pretrain-vision", str(path), override]) == 2
        assert field in capsys.readouterr().err


def test_unwritable_outputs_and_a_missing_text_tower_are_one_line_errors(tmp_path, clip_dir, bert_dir, shapes,
                                                                          monkeypatch):
    """A run_dir that is a file or read-only, a text tower that does not exist: refused before
    training; a full disk while saving the tower: an error naming it, and no half-written tower."""
    import errno
    import os

    from safetensors import SafetensorError

    from bad_input import run_cli

    def config(run_dir=str(tmp_path / "run"), **extra):
        path = tmp_path / "pretrain.yaml"
        path.write_text(yaml.safe_dump(pretrain_dict(clip_dir, bert_dir, shapes[0].jsonl, run_dir,
                                                     **{"steps": 1, **extra})))
        return str(path)

    (tmp_path / "a-file").write_text("")
    run_cli(["pretrain-vision", config(run_dir=str(tmp_path / "a-file"))], expect=["run_dir", "a-file", "not a folder"],
            watch=[tmp_path])
    run_cli(["pretrain-vision", config(text={"name_or_path": str(tmp_path / "no-bert")})],
            expect=["text.name_or_path", "no-bert"], watch=[tmp_path])
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != tmp_path)
    run_cli(["pretrain-vision", config()], expect=["run_dir", "read-only"], watch=[tmp_path])
    monkeypatch.undo()

    def full(*args, **kwargs):  # what safetensors raises on a full disk (not an OSError)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("flamingo.model.tensor_files.save_file", full)  # the checkpoint's weights
    run_cli(["pretrain-vision", config()], expect=["step-00000001", os.strerror(errno.ENOSPC)], watch=[tmp_path],
            allowed=[tmp_path / "run"])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []
    monkeypatch.undo()
    monkeypatch.setattr("safetensors.torch.save_file", full)  # the tower's (save_vision_encoder's own import)
    monkeypatch.setattr("flamingo.model.tensor_files.save_file", lambda *a, **k: None)
    run_cli(["pretrain-vision", config(run_dir=str(tmp_path / "run2"))], expect=["vision", os.strerror(errno.ENOSPC)],
            watch=[tmp_path], allowed=[tmp_path / "run2"])
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_linear_schedule_decays_to_the_floor_at_the_last_update():
    from flamingo.training.config import ScheduleConfig
    from flamingo.training.optim import learning_rate

    schedule = ScheduleConfig(kind="linear", warmup_steps=2)
    rates = [learning_rate(step, 1.0, schedule, 12) for step in range(12)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[-1] == 0.0
    assert rates[6] == pytest.approx(1 - 4 / 9)  # 4 of the 9 decay intervals done
