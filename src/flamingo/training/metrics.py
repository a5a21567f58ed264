"""Training visibility: a JSONL metrics log, optional TensorBoard, gate values, a progress bar.

RUN_DIR/metrics.jsonl holds one JSON object per logging interval:

    {"step": 100, "time": 12.3, "loss": 2.31, "losses": {"m3w": 2.1, "align": 3.2},
     "lr": 1e-05, "grad_norm": 0.82, "tokens": 51200, "tokens_per_s": 4100.0,
     "skipped_steps": 0, "nonfinite_in_a_row": 0,
     "gates": {"attn": {"0": 0.01, "4": -0.02}, "ffw": {"0": 0.03, "4": 0.0}}}

`step` counts completed updates; the losses are the means over the interval's finite updates
(`loss` is the weighted objective sum_m lambda_m * loss_m), `lr` and `gates` (tanh(alpha) of
every GATED XATTN-DENSE layer, the quantity of the paper's Figure 6) are those at the end of the
interval. On resume, records after the resumed step are dropped first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from flamingo.model.flamingo import Flamingo
from flamingo.outputs import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def gate_values(model: Flamingo) -> dict[str, dict[str, float]]:
    """tanh(alpha) of the attention and dense gates of every cross-attention layer, by LM index
    (the mean over hidden units for vector gates, `cross_attention.gate: vector`)."""
    with torch.no_grad():
        return {
            "attn": {str(i): float(torch.tanh(b.attn_gate.detach().float()).mean())
                     for i, b in model.cross_attn_layers.items()},
            "ffw": {str(i): float(torch.tanh(b.ffw_gate.detach().float()).mean())
                    for i, b in model.cross_attn_layers.items()},
        }


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return records


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Writes metrics on the main process only (a no-op elsewhere)."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None:
            self.path.write_text("")
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(f"logging.tensorboard needs the tensorboard package (pip install tensorboard): "
                                  f"{err}") from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out
