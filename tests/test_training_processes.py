"""Training across processes: a run killed with SIGKILL and resumed ends bit-exact with an
uninterrupted one, and 2-process DDP and FSDP runs (CPU, gloo, torchrun) match one process with
the same global batch, across a checkpoint written under one and resumed under the other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import checkout_env
from safetensors.torch import load_file
from test_training import make_config, tiny_train_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A subprocess that takes longer than this is hung, not slow: waits are bounded by it, never by an
# estimate of how long the work takes (a loaded machine can be many times slower than an idle one).
HANG_S = 900


def _env() -> dict[str, str]:
    return checkout_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return records


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "bridge.safetensors"))


def test_sigkill_between_checkpoints_then_resume_is_bit_exact(tmp_path, lm_dir, clip_dir):
    from flamingo.training.checkpoint import latest_checkpoint
    from flamingo.training.trainer import train

    steps, every = 14, 3
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "killed", steps=steps,
                           checkpoint={"every": every, "keep": 2})
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(data))

    # The uninterrupted reference (in this process; same thread count as the subprocesses).
    reference = train(make_config({**data, "run_dir": str(tmp_path / "reference")}))
    assert reference.step == steps

    # Between two checkpoints, far from the end (a random step made a failure unrepeatable).
    kill_after = every + 2
    command = [sys.executable, "-m", "flamingo.training", "train", str(config_path)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + HANG_S
    try:
        while not any(r["step"] >= kill_after for r in _metrics(killed)):
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in _metrics(killed))
    assert killed_at < steps and not (killed / "final").exists(), f"killed after step {killed_at}: too late"
    checkpoint = latest_checkpoint(killed / "checkpoints")
    assert checkpoint is not None
    resumed_from = int(checkpoint.name.split("-")[1])
    assert every <= resumed_from <= killed_at

    done = subprocess.run(command + ["--resume"], check=False, env=_env(), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained to step {steps}" in done.stdout

    expected, got = _final_weights(tmp_path / "reference"), _final_weights(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, (f"killed after step {killed_at}, resumed from step {resumed_from}: "
                           f"{len(different)} tensors differ, e.g. {different[:3]}")
    # The metrics log reads as one run: every step once, the same losses as the reference.
    records = _metrics(killed)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in _metrics(tmp_path / "reference")]


def test_sigterm_stops_after_the_current_update_with_a_checkpoint(tmp_path, lm_dir, clip_dir):
    """Preemption: SIGTERM ends the run between updates with a checkpoint of that exact update
    (no periodic checkpoint is due), exit status 128 + 15, no final model; --resume finishes it."""
    from flamingo.training.checkpoint import latest_checkpoint

    steps = 40
    run_dir = tmp_path / "run"
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(tiny_train_dict(lm_dir("llama"), clip_dir, run_dir, steps=steps,
                                                          checkpoint={"every": 1000, "keep": 2})))
    command = [sys.executable, "-m", "flamingo.training", "train", str(config_path)]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S
    while not _metrics(run_dir):
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = max(r["step"] for r in _metrics(run_dir))
    assert stopped_at < steps, "the signal came too late to test anything"
    assert f"stopped by SIGTERM at step {stopped_at}" in stderr and "--resume" in stderr
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step-{stopped_at:08d}"
    assert not (run_dir / "final").exists()

    done = subprocess.run(command + ["--resume"], check=False, env=_env(), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained to step {steps}" in done.stdout and (run_dir / "final").is_dir()
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, steps + 1))


def _torchrun(config_path: Path, *overrides: str, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "flamingo.training", "train", str(config_path), *overrides]
    done = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-5000:])
    return done


def test_two_process_ddp_then_fsdp_resume_match_one_process_with_the_same_global_batch(tmp_path, lm_dir, clip_dir):
    """2 ranks x batch B (torchrun, gloo on CPU) == 1 process x batch 2B: same samples, same
    updates. Steps 1-2 run under DDP and checkpoint; steps 3-4 resume from that checkpoint under
    FSDP (sharded frozen and trainable weights, gathered again for the final weights)."""
    from flamingo.training.trainer import train

    steps = 4
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "multi", steps=steps,
                           checkpoint={"every": 2, "keep": 2})
    data["datasets"][1]["batch_size"] = 1  # 2 ranks x 1 vs 1 x 2: uneven token counts per rank
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(data))

    single = dict(data, run_dir=str(tmp_path / "single"),
                  datasets=[dict(d, batch_size=2 * d["batch_size"]) for d in data["datasets"]])
    reference = train(make_config(single))

    def close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)

    def checkpoint(run: str, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "checkpoints" / f"step-{step:08d}" / "bridge.safetensors"))

    _torchrun(config_path, "steps=2", "distributed.strategy=ddp")
    records = _metrics(tmp_path / "multi")
    assert [r["step"] for r in records] == [1, 2]
    assert [r["loss"] for r in records] == pytest.approx([r.loss for r in reference.history[:2]], rel=1e-5)
    close(checkpoint("multi", 2), checkpoint("single", 2))

    _torchrun(config_path, f"steps={steps}", "distributed.strategy=fsdp", "--resume")
    records = _metrics(tmp_path / "multi")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["loss"] for r in records] == pytest.approx([r.loss for r in reference.history], rel=1e-5)
    assert [r["tokens"] for r in records] == [h.input_tokens for h in reference.history]
    close(_final_weights(tmp_path / "multi"), _final_weights(tmp_path / "single"))
    assert not all(torch.equal(checkpoint("multi", 2)[k], checkpoint("multi", 4)[k]) for k in checkpoint("multi", 2))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_node_torchrun(config_path: Path, *overrides: str) -> None:
    """`flamingo train` as two "nodes" on this machine: two torchrun agents of one process each
    (--nnodes 2), meeting through the c10d rendezvous at a localhost endpoint under one rdzv id,
    as the docs' multi-node command runs on two machines (there the endpoint is the first node's
    address). The first agent to start hosts the rendezvous store; ranks are given out by it."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=flamingo-test-{port}",
               "--local-addr=localhost", "--max-restarts=0",
               "-m", "flamingo.training", "train", str(config_path), *overrides]
    agents = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=HANG_S) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (stdout, stderr) in zip(agents, outputs):
        assert agent.returncode == 0, (stdout[-2000:], stderr[-5000:])


def test_two_nodes_through_c10d_rendezvous_checkpoint_resume_and_match_one_process(tmp_path, lm_dir, clip_dir):
    """2 "nodes" x 1 process x batch B == 1 process x batch 2B, through a checkpoint at step 2 and
    a resume of the two-node job from it (the checkpoint folder shared, as on a shared file system)."""
    from flamingo.training.trainer import train

    steps = 3
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "nodes", steps=steps,
                           checkpoint={"every": 2, "keep": 2})
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(data))
    single = dict(data, run_dir=str(tmp_path / "single"),
                  datasets=[dict(d, batch_size=2 * d["batch_size"]) for d in data["datasets"]])
    reference = train(make_config(single))

    _two_node_torchrun(config_path, "steps=2")
    assert [r["step"] for r in _metrics(tmp_path / "nodes")] == [1, 2]
    assert (tmp_path / "nodes" / "checkpoints" / "step-00000002").is_dir()
    _two_node_torchrun(config_path, f"steps={steps}", "--resume")
    records = _metrics(tmp_path / "nodes")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["loss"] for r in records] == pytest.approx([r.loss for r in reference.history], rel=1e-5)
    got, expected = _final_weights(tmp_path / "nodes"), _final_weights(tmp_path / "single")
    assert got.keys() == expected.keys()
    for name in expected:  # Adam turns the gloo all-reduce's rounding on a near-zero gradient into ~4e-5
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda detail, name=name: f"{name}: {detail}")
    provenance = json.loads((tmp_path / "nodes" / "final" / "provenance.json").read_text())
    assert provenance["training"]["processes"] == 2 and provenance["training"]["steps"] == steps
    card = (tmp_path / "nodes" / "final" / "README.md").read_text()
    assert f"trained for {steps} optimizer steps (2 process(es), accumulation 1, seed 0" in card
