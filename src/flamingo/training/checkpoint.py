"""Atomic training checkpoints: write a temporary folder, fsync, rename; keep the last K.

A checkpoint is a folder `step-00001000/` under the checkpoint directory holding

    config.yaml          the model's FlamingoConfig        } together a saved model directory:
    bridge.safetensors   the trainable weights             } `load_pretrained(folder)` works
    adapter_*            a LoRA run's adapters, in PEFT's format (flamingo.model.lora)
    state.pt             optimizer, step, data positions, RNG states, counters (tensors and
                         plain Python values only; read back with torch.load(weights_only=True))
    train_config.yaml    the training config of the run

It is written under a temporary name (`.tmp-step-...`), every file and the folder are fsynced,
and only then is it renamed to its final name: a folder named `step-*` is always complete, and a
crash at any moment leaves the previous checkpoints intact (the stale temporary folder is
ignored and removed by the next save). Old checkpoints are first renamed away, then deleted, so
a crash while pruning never leaves a half-deleted `step-*` folder either.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from flamingo.config_io import short
from flamingo.errors import UserError
from flamingo.model.config import FlamingoConfig
from flamingo.model.weights import WEIGHTS_FILE, write_model_files

STATE_FILE = "state.pt"
TRAIN_CONFIG_FILE = "train_config.yaml"
FORMAT = "flamingo-train-checkpoint-v1"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointLoadError(UserError):
    """A checkpoint folder is missing or unreadable."""


class CheckpointWriteError(UserError):
    """A checkpoint cannot be written (disk full, no permission); nothing half-written is left."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resolve_resume(checkpoint_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint a run starts from: None for a fresh run (refused when `checkpoint_dir`
    already holds checkpoints), the latest one for "auto" (None when there is none), or the
    folder given."""
    from flamingo.model.config import ConfigError

    latest = latest_checkpoint(checkpoint_dir)
    if resume is None:
        if latest is not None:
            raise ConfigError(f"{checkpoint_dir} already holds checkpoints (latest: {latest.name}); "
                              f"resume with --resume, or choose another run_dir")
        return None
    if str(resume) == "auto":
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"resume: checkpoint folder {path} does not exist")
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    model_config: FlamingoConfig, train_config_yaml: str | None = None,
                    keep: int | None = None) -> Path:
    """Atomically write checkpoint `step` under `directory`; then keep only the last `keep`."""
    return save_checkpoint_files(directory, step, lambda folder: write_model_files(folder, tensors, model_config),
                                 state, train_config_yaml, keep)


def save_checkpoint_files(directory: str | Path, step: int, write_files: Callable[[Path], None],
                          state: dict[str, Any], train_config_yaml: str | None = None,
                          keep: int | None = None) -> Path:
    """Atomically write checkpoint `step` under `directory`: `write_files(folder)` writes the
    weights, then state.pt and train_config.yaml are added; then keep only the last `keep`."""
    directory = Path(directory)
    for stale in directory.glob(".tmp-step-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(".old-step-*"):  # left by a crash while pruning
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write_files(tmp)
        torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
        if train_config_yaml is not None:
            (tmp / TRAIN_CONFIG_FILE).write_text(train_config_yaml)
        for path in tmp.iterdir():
            _fsync_file(path)
        _fsync_dir(tmp)
    except OSError as err:  # a full disk, a read-only folder: no half-written checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"checkpoint {directory / name} cannot be written: {err.strerror or err}") from None
    final = directory / name
    if final.exists():  # the same step saved again (e.g. a run resumed from it)
        old = directory / f".old-{name}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(directory)
    if keep is not None:
        prune_checkpoints(directory, keep)
    return final


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was removed."""
    directory = Path(directory)
    removed = []
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        trash = directory / f".old-{path.name}-{os.getpid()}"
        path.rename(trash)  # atomic: the step-* name disappears at once
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    if removed:
        _fsync_dir(directory)
    return removed


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def load_checkpoint(path: str | Path, weights_file: str = WEIGHTS_FILE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, state) of a checkpoint folder; nothing is unpickled beyond tensors and
    plain Python values."""
    path = Path(path)
    weights, state_file = path / weights_file, path / STATE_FILE
    if not weights.is_file() or not state_file.is_file():
        raise CheckpointLoadError(f"{path} is not a training checkpoint (expected {weights_file} and {STATE_FILE})")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - any corruption: one clear line
        raise CheckpointLoadError(f"checkpoint {path}: {weights_file} is unreadable: {_first_line(err)}") from None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message runs over many lines and suggests weights_only=False
        raise CheckpointLoadError(f"checkpoint {path}: {STATE_FILE} is not a file of tensors and plain values "
                                  f"(refused by torch.load with weights_only=True; nothing was unpickled)") from None
    except Exception as err:  # noqa: BLE001 - any corruption: one clear line
        raise CheckpointLoadError(f"checkpoint {path}: {STATE_FILE} is unreadable: {_first_line(err)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointLoadError(f"checkpoint {path}: {STATE_FILE} is not a {FORMAT} file")
    problem = _state_problem(state)
    if problem:
        raise CheckpointLoadError(f"checkpoint {path}: {STATE_FILE}: {problem}")
    return tensors, state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a state.pt (None: what save_checkpoint writes)."""
    def is_int(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not is_int(state.get("step"), 0):
        return f"step: expected an integer >= 0, got {short(state.get('step'))}"
    # world_size is recorded by the Flamingo trainer; other writers (pretrain-vision) keep one RNG state per process
    world = state.get("world_size", len(state["rng"]) if isinstance(state.get("rng"), list) else None)
    if not is_int(world, 1):
        return f"world_size: expected an integer >= 1, got {short(world)}"
    for key in ("data", "rng"):
        value = state.get(key)
        if not (isinstance(value, list) and len(value) == world and all(isinstance(v, dict) for v in value)):
            return f"{key}: expected a list of {world} mapping(s), one per process, got {short(value)}"
    for rng in state["rng"]:
        absent = [k for k in RNG_KEYS if not isinstance(rng.get(k), torch.Tensor)]
        if absent:
            return f"rng: missing or non-tensor generator state(s) {absent}"
    optimizer = state.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)):
        return f"optimizer: expected null or a mapping with 'state' and 'param_groups', got {short(optimizer)}"
    counters = state.get("counters", {})
    if not (isinstance(counters, dict) and all(is_int(v, 0) for v in counters.values())):
        return f"counters: expected a mapping of integers >= 0, got {short(counters)}"
    return None


# ---------------------------------------------------------------------------------- RNG states
RNG_KEYS = ("python_version", "python_state", "python_gauss", "numpy_keys", "numpy_misc", "torch")


def rng_state() -> dict[str, torch.Tensor]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors only."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_version": torch.tensor(version),
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_misc": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    gauss = state["python_gauss"].tolist()
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()),
                     gauss[1] if gauss[0] else None))
    pos, has_gauss, cached = state["numpy_misc"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
