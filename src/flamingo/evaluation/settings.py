"""The evaluation protocol's settings (one dataclass; saved verbatim in the results)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from flamingo.config_io import check_fields, short
from flamingo.data.benchmarks.samples import EvalDataError

PAPER_SHOTS = (0, 4, 8, 16, 32)
MAX_BATCH_SIZE = 4096


@dataclass
class EvalSettings:
    shots: list[int] = field(default_factory=lambda: list(PAPER_SHOTS))
    trials: int = 3  # random demo draws per shot count (RICES is deterministic: one trial)
    rices: bool = False  # retrieval-based demos (A.2) instead of random ones
    ensemble: bool = False  # close-ended: average log-likelihoods over `ensemble_size` demo orders
    ensemble_size: int = 6
    split: str = "test"  # "test": test support + official test query; "validation": both from train
    support_size: int = 2048  # B.1.4
    support_per_class: int = 32  # classification tasks
    query_size: int | None = None  # None: the whole test split / the task's validation size
    query_per_class: int = 10  # classification validation query
    seed: int = 0
    demo_mode: str = "shared"  # "shared": one draw per trial for all queries; "per_query": one per query
    zero_shot_examples: int = 2  # text-only examples of the zero-shot prompt (Sec. 3)
    batch_size: int = 8  # queries per forward
    num_beams: int = 3  # open-ended decoding (paper: beam search, width 3)
    max_new_tokens: int | None = None  # None: the task's default
    length_penalty: float = 0.0  # as OpenFlamingo's evaluation
    length_normalize: bool = False  # close-ended: rank by mean instead of summed log-likelihood
    video_frames: int = 30  # paper: 30 frames at 3 FPS at inference
    video_fps: float = 3.0
    max_prompt_tokens: int | None = None  # None: the LM's context; longer prompts are "OOC"

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise EvalDataError(message)

        check_fields(self, "eval settings", error=EvalDataError)
        check(self.batch_size <= MAX_BATCH_SIZE, f"batch_size: expected at most {MAX_BATCH_SIZE}, got {self.batch_size}")
        check(self.seed >= 0, f"seed: expected an integer >= 0, got {self.seed}")

        check(bool(self.shots) and all(isinstance(s, int) and s >= 0 for s in self.shots),
              f"shots: expected non-negative integers, got {short(self.shots)}")
        check(len(set(self.shots)) == len(self.shots), f"shots: repeated values in {short(self.shots)}")
        for name in ("trials", "ensemble_size", "support_size", "support_per_class", "query_per_class",
                     "batch_size", "num_beams", "video_frames", "zero_shot_examples"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("query_size", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1),
                  f"{name}: expected an integer >= 1 or none, got {value!r}")
        check(self.split in ("test", "validation"), f"split: expected 'test' or 'validation', got {self.split!r}")
        check(self.demo_mode in ("shared", "per_query"),
              f"demo_mode: expected 'shared' or 'per_query', got {self.demo_mode!r}")
        check(0 < self.video_fps < math.inf, f"video_fps: expected > 0 and finite, got {self.video_fps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
