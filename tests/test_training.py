"""Training: config, optimiser groups and schedule, gradient checkpointing, non-finite updates,
atomic checkpoints, bf16 on CPU, accumulation/round-robin objectives, and a small end-to-end run
on coloured shapes whose loss falls and whose model learns to use the image."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from flamingo.model.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_train_dict(lm_path, clip_path, run_dir, **top) -> dict:
    """A training config over the tiny test LM/CLIP with two synthetic shape datasets."""
    data = {
        "model": {
            "vision": {"kind": "clip", "name_or_path": str(clip_path)},
            "lm": {"name_or_path": str(lm_path)},
            "perceiver": {"depth": 2, "num_latents": 4, "heads": 2, "head_dim": 8, "max_frames": 4},
            "cross_attention": {"every": 2, "first_layer": 0, "heads": 2, "head_dim": 8},
        },
        "datasets": [
            {"name": "shapes", "kind": "synthetic_shapes", "weight": 1.0, "batch_size": 4},
            {"name": "pairs2", "kind": "synthetic_shapes", "weight": 0.5, "batch_size": 2, "images_per_sample": 2},
        ],
        "run_dir": str(run_dir),
        "steps": 6,
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 3, "keep": 2},
        "logging": {"every": 1, "progress_bar": False},
        "threads": 1,
    }
    for key, value in top.items():
        data[key] = value
    return data


def make_config(data: dict):
    from flamingo.training.config import TrainConfig

    return TrainConfig.from_dict(data)


def trainable(model) -> dict[str, torch.Tensor]:
    from flamingo.training.distributed import unwrap

    return {k: v.detach().clone() for k, v in unwrap(model).trainable_state_dict().items()}


@pytest.fixture(scope="module")
def caption_lm_dir(tmp_path_factory):
    """A tiny Llama pre-trained (a few seconds) on the shape captions, so that it knows the
    caption template and only the colour and shape remain to be read from the image."""
    from conftest import make_lm_config, make_tokenizer
    from transformers import AutoModelForCausalLM

    from flamingo.data.synthetic import COLOURS, SHAPES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    lm = AutoModelForCausalLM.from_config(make_lm_config("llama", len(tokenizer)))
    ids = [[tokenizer.bos_token_id, *tokenizer(f"a {c} {s}", add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id] for c in COLOURS for s in SHAPES]
    width = max(map(len, ids))
    inputs = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(40):
        lm(input_ids=inputs, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("caption-lm")
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.set_num_threads(threads)
    return path


# ------------------------------------------------------------------------------------- config
def test_config_file_model_reference_overrides_and_errors(tmp_path, lm_dir, clip_dir):
    from flamingo.training.config import load_train_config

    model_file = tmp_path / "model.yaml"
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run")
    model_file.write_text(yaml.safe_dump(data.pop("model")))
    data["model"] = "model.yaml"  # relative to the training config's folder
    del data["run_dir"]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))

    config = load_train_config(path, ["optim.lr=3e-4", "model.cross_attention.every=1", "datasets.1.weight=0.25",
                                      "schedule.kind=cosine", "optim.betas=[0.9, 0.95]", "checkpoint.dir=ck"])
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.model.cross_attention.every == 1
    assert config.weights == {"shapes": 1.0, "pairs2": 0.25}
    assert config.datasets[1].options == {"images_per_sample": 2}
    assert config.schedule.kind == "cosine" and config.optim.betas == (0.9, 0.95)
    assert config.run_dir == str(Path("runs") / "exp")
    # YAML round trip: the saved config of a run loads back to the same thing.
    again = make_config(yaml.safe_load(config.to_yaml()))
    assert again.to_dict() == config.to_dict()

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_train_config(path, list(overrides))
        return str(info.value)

    assert "unknown field(s) ['lrate']" in error("optim.lrate=1")
    assert "optim.lr: expected a number" in error("optim.lr=fast")
    assert "schedule.kind: expected one of 'constant', 'cosine', 'linear'" in error("schedule.kind=exponential")
    assert "train config field steps: expected an integer in [1, 1,000,000,000]" in error("steps=0")
    assert "seed: expected an integer in [0, 4294967295]" in error("seed=-1")  # keyed_rng's keys
    assert "unique dataset names" in error("datasets.1.name=shapes")
    assert "datasets.5 must index the list" in error("datasets.5.weight=1")
    assert "cross_attention" in error("model.cross_attention.every=0")
    assert "expected KEY=VALUE" in error("steps")
    assert "datasets.0.min_images: expected >= 1 under distributed.strategy fsdp" in error(
        "distributed.strategy=fsdp", "datasets.0.min_images=0")
    assert load_train_config(path, ["distributed.strategy=ddp", "datasets.0.min_images=0"])


def test_shipped_training_configs_parse():
    from flamingo.training.config import load_train_config

    paths = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        config = load_train_config(path)
        assert config.steps >= 1 and config.datasets and config.model.cross_attention_layers(32)


# ----------------------------------------------------------------------- optimiser, schedule
def test_weight_decay_groups_exempt_only_the_resampler(lm_dir):
    from conftest import build_tiny

    from flamingo.training.config import OptimConfig
    from flamingo.training.optim import build_optimizer, parameter_groups

    model = build_tiny(lm_dir("llama"))
    named = model.trainable_state_dict()
    groups = {g["group"]: g for g in parameter_groups(named, OptimConfig(weight_decay=0.1))}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert sorted(groups["decay"]["names"] + groups["no_decay"]["names"]) == sorted(named)
    assert groups["no_decay"]["names"] and all(n.startswith("perceiver.") for n in groups["no_decay"]["names"])
    assert "perceiver.latents" in groups["no_decay"]["names"]
    decayed = groups["decay"]["names"]
    # The paper's rule: everything but the resampler, gates and LayerNorms included.
    assert "cross_attn.0.attn_gate" in decayed and "cross_attn.0.ffw.norm.weight" in decayed
    assert "new_token_embeddings.new_rows" in decayed

    common = {g["group"]: g["names"] for g in
              parameter_groups(named, OptimConfig(decay_norms_biases_gates=False))}
    assert "cross_attn.0.attn_gate" in common["no_decay"] and "cross_attn.0.ffw.norm.weight" in common["no_decay"]
    assert "cross_attn.0.attn.to_q.weight" in common["decay"]

    # What AdamW does with them: a step with zero gradients only applies the decoupled decay.
    optimizer = build_optimizer(named, OptimConfig(lr=0.5, weight_decay=0.1))
    before = {k: v.detach().clone() for k, v in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in named.items():
        factor = 1.0 if name.startswith("perceiver.") else 1 - 0.5 * 0.1
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_lr_scale_multiplies_the_learning_rate_by_longest_prefix(lm_dir):
    from conftest import build_tiny

    from flamingo.training.config import OptimConfig
    from flamingo.training.optim import build_optimizer, set_learning_rate

    model = build_tiny(lm_dir("llama"))
    named = model.trainable_state_dict()
    config = OptimConfig(lr=0.1, weight_decay=0.0, lr_scale={"perceiver": 0.0, "cross_attn": 0.5,
                                                             "cross_attn.0.attn_gate": 2.0})
    optimizer = build_optimizer(named, config)
    set_learning_rate(optimizer, 0.1)
    before = {k: v.detach().clone() for k, v in named.items()}
    for p in named.values():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every element by lr (its scaled one here)
    for name, param in named.items():
        lr = 0.0 if name.startswith("perceiver.") else 0.2 if name == "cross_attn.0.attn_gate" else \
            0.05 if name.startswith("cross_attn.") else 0.1
        torch.testing.assert_close(before[name] - param.detach(), torch.full_like(param, lr), msg=name)


def test_lr_delay_keeps_a_prefix_frozen_then_warms_it_up(lm_dir):
    from conftest import build_tiny

    from flamingo.training.config import OptimConfig
    from flamingo.training.optim import build_optimizer, set_learning_rate

    model = build_tiny(lm_dir("llama"))
    named = model.trainable_state_dict()
    optimizer = build_optimizer(named, OptimConfig(lr=0.1, weight_decay=0.1, lr_scale={"perceiver": 0.5},
                                                   lr_delay={"perceiver": 3}))
    by_name = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    resampler = [p for n, p in named.items() if n.startswith("perceiver.")]
    others = [p for n, p in named.items() if not n.startswith("perceiver.")]
    expected = {0: 0.0, 2: 0.0, 3: 0.1 * 0.5 / 4, 4: 0.1 * 0.5 * 2 / 4, 6: 0.05, 50: 0.05}
    for step, resampler_lr in expected.items():
        set_learning_rate(optimizer, 0.1, step, warmup_steps=4)
        assert [by_name[id(p)]["lr"] for p in resampler] == pytest.approx([resampler_lr] * len(resampler)), step
        assert [by_name[id(p)]["lr"] for p in others] == pytest.approx([0.1] * len(others)), step
    set_learning_rate(optimizer, 0.1, 0)
    before = [p.detach().clone() for p in resampler]
    for p in named.values():
        p.grad = torch.ones_like(p)
    optimizer.step()  # lr 0: neither the update nor the decoupled weight decay moves them
    assert all(torch.equal(b, p) for b, p in zip(before, resampler))


def test_warmup_then_constant_and_cosine():
    from flamingo.training.config import ScheduleConfig
    from flamingo.training.optim import learning_rate

    constant = ScheduleConfig(kind="constant", warmup_steps=4)
    lrs = [learning_rate(s, 1e-4, constant, 100) for s in range(8)]
    assert lrs[:4] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4])
    assert lrs[4:] == pytest.approx([1e-4] * 4)
    assert learning_rate(99, 1e-4, constant, 100) == pytest.approx(1e-4)
    assert learning_rate(0, 1e-4, ScheduleConfig(warmup_steps=0), 100) == pytest.approx(1e-4)

    cosine = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    # 105 updates: 4 of warmup, then 0..100 % of the half cosine over updates 4..104.
    assert learning_rate(3, 1e-4, cosine, 105) == pytest.approx(1e-4)
    assert learning_rate(4, 1e-4, cosine, 105) == pytest.approx(1e-4)
    assert learning_rate(54, 1e-4, cosine, 105) == pytest.approx(0.55e-4)
    assert learning_rate(104, 1e-4, cosine, 105) == pytest.approx(1e-5)
    lrs = [learning_rate(s, 1e-4, cosine, 105) for s in range(4, 105)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


# ------------------------------------------------------------------- gradient checkpointing
def _shape_batch(model, batch_size=3, images=2, seed=5):
    from flamingo.data.synthetic import ShapesSource

    source = ShapesSource("g", model.tokenizer, model.media_token_id, model.eoc_token_id,
                          model.vision_encoder.image_processor(), batch_size, seed=seed,
                          images_per_sample=images)
    return source.batch(0)


@pytest.mark.parametrize("family", ["llama", "mpt"])  # media as an argument / set on the layers for the call
def test_gradient_checkpointing_gives_the_same_gradients(lm_dir, clip_dir, family):
    from conftest import build_with_vision, randomize_gates

    from flamingo.model.cross_attention import GatedCrossAttentionBlock
    from flamingo.training.activation_checkpointing import enable_gradient_checkpointing
    from flamingo.model.flamingo import token_nll_sum

    model = build_with_vision(lm_dir(family), clip_dir, **{"cross_attention.every": 1})
    if family == "mpt":
        model.media_passing = "layers"  # whatever this transformers does with MPT's keyword arguments
    randomize_gates(model)
    batch = _shape_batch(model)

    calls = []
    original = GatedCrossAttentionBlock.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    def grads() -> tuple[dict[str, torch.Tensor], int]:
        calls.clear()
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                    num_media=batch.num_media)
        token_nll_sum(out.logits, batch.labels).backward()
        return {k: v.grad.clone() for k, v in model.trainable_state_dict().items()}, len(calls)

    GatedCrossAttentionBlock.forward = counting
    try:
        plain, plain_calls = grads()
        assert enable_gradient_checkpointing(model) == 4
        checkpointed, checkpointed_calls = grads()
    finally:
        GatedCrossAttentionBlock.forward = original
    # Every xattn layer ran again in the backward pass, with the media it needs.
    assert plain_calls == 4 and checkpointed_calls == 8
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_in_training_matches_plain(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import train

    base = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "a", steps=3)
    plain = train(make_config(base))
    checkpointed = train(make_config({**base, "run_dir": str(tmp_path / "b"), "gradient_checkpointing": True}))
    assert [r.loss for r in plain.history] == pytest.approx([r.loss for r in checkpointed.history], rel=1e-5)
    a, b = trainable(plain.model), trainable(checkpointed.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- non-finite loss
class PoisonedSource:
    """Wraps a source: the batches at the given positions get NaN pixels (-> NaN loss)."""

    def __init__(self, source, positions):
        self.source, self.positions = source, set(positions)

    def __iter__(self):
        for batch in self.source:
            if self.source.position - 1 in self.positions:
                batch.pixel_values.fill_(float("nan"))
            yield batch

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path, lm_dir, clip_dir):
    from flamingo.model.weights import build_flamingo
    from flamingo.training.data import build_sources
    from flamingo.training.metrics import read_metrics
    from flamingo.training.trainer import Trainer, TrainingError

    config = make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=6,
                                         max_nonfinite_in_a_row=3))
    torch.manual_seed(0)
    model = build_flamingo(config.model)
    sources = build_sources(config, model)
    sources["pairs2"] = PoisonedSource(sources["pairs2"], {1, 2})
    trainer = Trainer(config, model=model, sources=sources)
    results, snapshots = [], [trainable(model)]
    for _ in range(4):
        results.append(trainer.train_step())
        snapshots.append(trainable(model))
    assert [r.skipped for r in results] == [False, True, True, False]
    assert trainer.skipped_steps == 2 and trainer.nonfinite_in_a_row == 0
    assert math.isnan(results[1].loss) and math.isnan(results[1].losses["pairs2"])
    assert math.isfinite(results[1].losses["shapes"])  # the other dataset was fine
    for skipped in (1, 2):  # no update at all: weights (and optimizer) untouched
        assert all(torch.equal(snapshots[skipped][k], snapshots[skipped + 1][k]) for k in snapshots[0])
    assert not all(torch.equal(snapshots[3][k], snapshots[4][k]) for k in snapshots[0])
    assert all(torch.isfinite(v).all() for v in snapshots[4].values())
    trainer.close()

    # Non-finite every time: the run stops after max_nonfinite_in_a_row with a clear message.
    config = make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run2", steps=6,
                                         max_nonfinite_in_a_row=3))
    sources = build_sources(config, model)
    sources["shapes"] = PoisonedSource(sources["shapes"], range(100))
    with pytest.raises(TrainingError, match=r"not finite in 3 consecutive updates \(steps 1-3"):
        Trainer(config, model=model, sources=sources).fit()
    last = read_metrics(tmp_path / "run2")[-1]
    assert last["step"] == 3 and last["skipped_steps"] == 3 and last["nonfinite_in_a_row"] == 3
    assert last["loss"] is None

    # A run shorter than that limit, every update non-finite: an error too, and no final model.
    config = make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run3", steps=2,
                                         max_nonfinite_in_a_row=3))
    sources = build_sources(config, model)
    sources["shapes"] = PoisonedSource(sources["shapes"], range(100))
    with pytest.raises(TrainingError, match=r"every update of the run \(2\) had a non-finite loss"):
        Trainer(config, model=model, sources=sources).fit()
    assert not (tmp_path / "run3" / "final").exists()


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path, lm_dir, clip_dir, monkeypatch):
    from conftest import build_with_vision

    from flamingo.model.weights import load_pretrained
    from flamingo.training import checkpoint as ckpt

    model = build_with_vision(lm_dir("llama"), clip_dir)
    tensors = model.trainable_state_dict()
    directory = tmp_path / "ck"

    def state(step):
        return {"step": step, "world_size": 1, "optimizer": None, "rng": [ckpt.rng_state()],
                "data": [{"shapes": {"position": step}}]}

    for step in (1, 2):
        ckpt.save_checkpoint(directory, step, tensors, state(step), model.config, keep=5)
    assert [s for s, _ in ckpt.list_checkpoints(directory)] == [1, 2]

    # A crash in the middle of writing checkpoint 3 (after part of state.pt is on disk).
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("disk vanished")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(ckpt.CheckpointWriteError, match="step-00000003 cannot be written: disk vanished"):
        ckpt.save_checkpoint(directory, 3, tensors, state(3), model.config, keep=5)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert not list(directory.glob(".tmp-step-00000003-*"))  # a failed write removes its folder
    (directory / ".tmp-step-00000003-999").mkdir()  # a killed process cannot: its half-written folder ...
    latest = ckpt.latest_checkpoint(directory)  # ... is invisible: the previous one is the latest
    assert latest.name == "step-00000002"
    loaded, saved = ckpt.load_checkpoint(latest)
    assert saved["step"] == 2 and saved["data"][0]["shapes"]["position"] == 2
    assert all(torch.equal(loaded[k], tensors[k].detach()) for k in tensors)
    assert isinstance(saved["rng"][0]["torch"], torch.Tensor)

    # The next save cleans up, and pruning keeps the newest K.
    for step in (4, 5, 6):
        ckpt.save_checkpoint(directory, step, tensors, state(step), model.config, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(directory)] == [5, 6]
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000005", "step-00000006"]
    # A checkpoint folder is a model directory too.
    assert torch.equal(load_pretrained(directory / "step-00000006").perceiver.latents, model.perceiver.latents)

    # Damaged checkpoints are reported clearly, never half-loaded.
    (directory / "step-00000006" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointLoadError, match="state.pt is not a file of tensors and plain values"):
        ckpt.load_checkpoint(directory / "step-00000006")


def test_rng_state_round_trip():
    import random

    import numpy as np

    from flamingo.training.checkpoint import rng_state, set_rng_state

    random.gauss(0, 1)
    np.random.randn()
    state = rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints_and_resume_continues(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import train

    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=3)
    first = train(make_config(data))
    assert first.last_checkpoint.name == "step-00000003"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(make_config(data))
    longer = train(make_config({**data, "steps": 5}), resume="auto")
    assert [r.step for r in longer.history] == [4, 5]
    assert longer.last_checkpoint.name == "step-00000005"


@pytest.mark.parametrize("arrives", ["during an update", "between updates"])
def test_a_signal_between_checkpoints_stops_cleanly_and_the_resumed_run_is_bit_exact(tmp_path, lm_dir, clip_dir,
                                                                                    monkeypatch, arrives):
    """SIGTERM in update 5 (during its forward pass, or while update 4 is being logged) of a run
    that checkpoints every 3: the run stops after update 5 with a checkpoint of it, and resuming
    from that checkpoint ends with exactly the weights of a run never stopped (the checkpoint
    records the data positions of the batches trained on, not of batches drawn for update 6)."""
    import signal

    from flamingo.model.flamingo import Flamingo
    from flamingo.training.metrics import MetricsLogger
    from flamingo.training.trainer import train

    steps = 7
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "stopped", steps=steps,
                           checkpoint={"every": 3, "keep": 5})
    reference = train(make_config({**data, "run_dir": str(tmp_path / "reference")}))

    if arrives == "during an update":  # two forward passes per update (two datasets)
        forward, calls = Flamingo.forward, []

        def forward_with_signal(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2 * 4 + 1:
                signal.raise_signal(signal.SIGTERM)
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(Flamingo, "forward", forward_with_signal)
    else:
        log = MetricsLogger.log

        def log_with_signal(self, record):
            log(self, record)
            if record["step"] == 4:
                signal.raise_signal(signal.SIGTERM)

        monkeypatch.setattr(MetricsLogger, "log", log_with_signal)
    stopped = train(make_config(data))
    monkeypatch.undo()
    assert stopped.interrupted_by == "SIGTERM" and stopped.step == 5 and stopped.final_dir is None
    assert stopped.last_checkpoint.name == "step-00000005"

    resumed = train(make_config(data), resume="auto")
    assert [r.step for r in resumed.history] == [6, 7]
    assert [r.loss for r in resumed.history] == [r.loss for r in reference.history[5:]]
    expected, got = trainable(reference.model), trainable(resumed.model)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


# ------------------------------------------------------------------ objectives and precision
def test_accumulation_equals_a_bigger_batch(tmp_path, lm_dir, clip_dir):
    """Token-weighted losses: batch 4 == 2 micro-batches of 2 (the same samples)."""
    from flamingo.training.trainer import train

    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "a", steps=3)
    big = train(make_config(data))
    small = dict(data, run_dir=str(tmp_path / "b"), accumulation=2,
                 datasets=[dict(d, batch_size=d["batch_size"] // 2) for d in data["datasets"]])
    accumulated = train(make_config(small))
    assert [r.loss for r in big.history] == pytest.approx([r.loss for r in accumulated.history], rel=1e-5)
    a, b = trainable(big.model), trainable(accumulated.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=name)


def test_round_robin_uses_one_dataset_per_update(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import Trainer

    pytest.importorskip("tensorboard")
    config = make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=5,
                                         objective="round_robin", logging={"every": 1, "tensorboard": True,
                                                                           "progress_bar": False}))
    trainer = Trainer(config)
    result = trainer.fit()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert [sorted(r.losses) for r in result.history] == [["shapes"], ["pairs2"], ["shapes"], ["pairs2"], ["shapes"]]
    assert trainer.sources["shapes"].state_dict()["position"] == 3
    assert trainer.sources["pairs2"].state_dict()["position"] == 2


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import Trainer

    config = make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=2, precision="bf16",
                                         frozen_dtype="bfloat16"))
    trainer = Trainer(config)
    result = trainer.fit()
    assert all(math.isfinite(r.loss) for r in result.history)
    model = result.model
    assert all(p.dtype == torch.float32 for p in model.trainable_state_dict().values())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values()
               if v.is_floating_point())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # Default on CPU: frozen weights stay as loaded (fp32).
    default = Trainer(make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run2", precision="bf16")))
    assert all(p.dtype == torch.float32 for p in default.model.parameters())


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_to_use_fp32(tmp_path, lm_dir, clip_dir, monkeypatch, capsys,
                                                              native):
    """bf16 autocast is emulated on CPUs without AVX512-BF16/AMX (~20x slower than fp32 on the
    project's AVX2 CPU): the trainer says so and names the fix, only there."""
    from flamingo.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    trainer_module.Trainer(make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", precision="bf16")))
    warned = "use precision: fp32" in capsys.readouterr().err
    assert warned != native
    trainer_module.Trainer(make_config(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run2")))
    assert "use precision: fp32" not in capsys.readouterr().err  # fp32: nothing to say


def test_bf16_frozen_weights_with_a_batch_norm_encoder_and_procedural_data(tmp_path, lm_dir, clip_dir):
    """EfficientNet's batch-norm statistics follow its bf16 weights (a mixed-dtype batch_norm
    fails), and the procedural episodes train through the same loop."""
    from flamingo.training.trainer import Trainer

    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=1, precision="bf16",
                           frozen_dtype="bfloat16")
    data["model"]["vision"] = {"kind": "efficientnet_lite0"}
    data["datasets"] = [{"name": "episodes", "kind": "procedural", "weight": 1.0, "batch_size": 2,
                         "tasks": {"binding": 1.0, "qa": 1.0}, "image_size": 64}]
    result = Trainer(make_config(data)).fit()
    assert math.isfinite(result.history[0].loss)
    bn = [m for m in result.model.vision_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.running_var.dtype == torch.bfloat16 for m in bn)


# ---------------------------------------------------------------------------- end to end
def test_tiny_training_run_learns_to_read_the_images(tmp_path, caption_lm_dir, clip_dir):
    from flamingo.model.flamingo import token_nll_sum
    from flamingo.model.weights import load_pretrained
    from flamingo.training.metrics import read_metrics
    from flamingo.training.plot import plot_run
    from flamingo.training.trainer import train

    data = tiny_train_dict(caption_lm_dir, clip_dir, tmp_path / "run", steps=60,
                           datasets=[{"name": "shapes", "kind": "synthetic_shapes", "batch_size": 8},
                                     {"name": "two", "kind": "synthetic_shapes", "weight": 0.25, "batch_size": 2,
                                      "images_per_sample": 2}],
                           schedule={"warmup_steps": 5}, checkpoint={"every": 30, "keep": 1},
                           logging={"every": 10, "progress_bar": False})
    result = train(make_config(data))
    losses = [r.loss for r in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    assert [r.lr for r in result.history[:6]] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1e-2])

    # The model reads the images: captions of held-out samples are likelier under their own
    # images than under another sample's.
    from flamingo.data.synthetic import ShapesSource

    model = result.model.eval()
    batch = ShapesSource("held-out", model.tokenizer, model.media_token_id, model.eoc_token_id,
                         model.vision_encoder.image_processor(), 48, seed=123).batch(0)
    with torch.no_grad():
        def loss(pixels):
            out = model(batch.input_ids, pixels, attention_mask=batch.attention_mask, num_media=batch.num_media)
            return float(token_nll_sum(out.logits, batch.labels)) / batch.num_tokens

        matched, shuffled = loss(batch.pixel_values), loss(batch.pixel_values.roll(1, 0))
    assert matched < shuffled - 0.05, (matched, shuffled)

    # Outputs: metrics with per-dataset losses and gates, a loadable final model, plots.
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert set(records[-1]["losses"]) == {"shapes", "two"}
    assert set(records[-1]["gates"]["attn"]) == {"0", "2"} and records[-1]["tokens_per_s"] > 0
    assert any(abs(v) > 1e-3 for v in records[-1]["gates"]["attn"].values())
    assert records[-1]["skipped_steps"] == 0 and records[-1]["grad_norm"] > 0
    final = load_pretrained(result.final_dir)
    for name, value in final.trainable_state_dict().items():
        assert torch.equal(value, result.model.trainable_state_dict()[name]), name
    pngs = plot_run(tmp_path / "run")
    assert [p.name for p in pngs] == ["loss.png", "gates.png", "optim.png"]
    assert all(p.stat().st_size > 5000 for p in pngs)


# ------------------------------------------------------------------------------------- CLI
def test_cli_train_print_config_plot_and_errors(tmp_path, lm_dir, clip_dir, capsys):
    import argparse

    from flamingo.cli import main
    from flamingo.training.cli import register

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=2)))
    assert main(["train", str(path), "--print-config", "steps=7", "model.cross_attention.every=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["model"]["cross_attention"]["every"] == 1

    assert main(["train", str(path), "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == "flamingo train: error: train config field optim.lr: expected a number > 0, got -1.0"
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(["train", str(path)]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["gates.png", "loss.png", "optim.png"]

    # register() plugs both subcommands into another parser (the main `flamingo` CLI).
    parser = argparse.ArgumentParser(prog="flamingo")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(path), "a=1", "--resume"])
    assert args.resume == "auto" and args.overrides == ["a=1"]


# ------------------------------------------------------------------- the real data pipeline
def test_data_pipeline_datasets_train_and_resume_exactly(tmp_path, lm_dir, clip_dir):
    """Datasets of the pipeline's kinds go through flamingo.data's loaders (files on disk), and
    their positions are checkpointed: 2 steps + resume to 4 == 4 steps."""
    pytest.importorskip("flamingo.data.loader")
    shapes = pytest.importorskip("flamingo.data.shapes")
    from flamingo.training.trainer import train

    pairs = shapes.make_shapes_dataset(tmp_path / "pairs", 12, kind="pairs", image_size=64)
    docs = shapes.make_shapes_dataset(tmp_path / "docs", 6, kind="interleaved", image_size=64)
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "full", steps=4, checkpoint={"every": 2, "keep": 1},
                           datasets=[{"name": "pairs", "kind": "pairs", "path": str(pairs.jsonl), "weight": 0.2,
                                      "batch_size": 4},
                                     {"name": "docs", "kind": "interleaved", "path": str(docs.shards),
                                      "batch_size": 2, "max_tokens": 64, "max_images": 3}])
    full = train(make_config(data))
    assert all(math.isfinite(r.loss) and set(r.losses) == {"pairs", "docs"} for r in full.history)
    assert full.records[-1]["data"]["pairs"]["records"] == 16  # the loader's counters are logged

    half = dict(data, run_dir=str(tmp_path / "resumed"))
    train(make_config(dict(half, steps=2)))
    resumed = train(make_config(half), resume="auto")
    assert [r.step for r in resumed.history] == [3, 4]
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history[2:]]
    a, b = trainable(full.model), trainable(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A finite dataset that runs out ends the run early, cleanly, with a checkpoint.
    one_epoch = dict(data, run_dir=str(tmp_path / "epoch"), steps=10,
                     datasets=[dict(data["datasets"][0], epochs=1), data["datasets"][1]])
    short = train(make_config(one_epoch))
    assert short.step == 3 and "ran out of data after 3 updates" in short.stopped_early
    assert short.last_checkpoint.name == "step-00000003" and short.final_dir.is_dir()

    with pytest.raises(ValueError, match="unknown field"):
        train(make_config(dict(data, run_dir=str(tmp_path / "bad"),
                               datasets=[dict(data["datasets"][0], max_tokenz=3)])))
