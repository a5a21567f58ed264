"""Robustness under distribution shift, measured as the CLIP / WiSE-FT line of work does: each model's
accuracy in distribution (ID: ImageNet) and on shifted test sets (OOD: ImageNetV2, ImageNet-R,
ImageNet-Sketch, ImageNet-A, ObjectNet, or any classification tasks), their average, and the
*effective robustness*: the OOD accuracy above what the ID accuracy predicts (Taori et al. 2020,
"Measuring Robustness to Natural Distribution Shifts in Image Classification").

The prediction is a linear fit in logit-scaled axes, logit(OOD) = slope * logit(ID) + intercept,
fitted by Taori et al. over standard ImageNet models (their testbed: 204 models, published as data
and plots at modestyachts.github.io/imagenet-testbed). No coefficients are built in: the paper
publishes the fits as lines in its figures and the testbed's data, not as numbers, and this code
does not carry numbers it cannot trace to a publication. Give each shift's fit (`LinearFit`, or
`--fit TASK=SLOPE,INTERCEPT` on the command line), e.g. fitted on the testbed's published
accuracies with logit(p) = ln(p / (1 - p)) on fractions; without one, a shift's effective
robustness is reported as null and its plot shows the y = x line only.

Every model is evaluated with `flamingo.evaluation.evaluate` (one resumable output directory per
model under OUT/evals/), so its scores are exactly what `flamingo eval` reports for it. The
report: robustness.json, robustness.md (a table) and robustness.png (ID vs OOD accuracy in logit
axes per shift and for the average, with the fit line and the WiSE-FT curve in alpha order).
Intervals are 95% Wilson score intervals over the queries scored (pooled over trials).
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo.data.benchmarks.data_config import DataConfig
from flamingo.data.benchmarks.samples import EvalDataError
from flamingo.data.benchmarks.tasks import get_task
from flamingo.errors import import_extra
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.suite import evaluate
from flamingo.model.flamingo import Flamingo
from flamingo.outputs import write_text_atomic

SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet")
METRIC = "top-1"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class LinearFit:
    """logit(OOD accuracy) = slope * logit(ID accuracy) + intercept, accuracies as fractions."""

    slope: float
    intercept: float
    source: str = "given"

    def predict(self, id_accuracy: float) -> float:
        """The OOD accuracy (%) the fit predicts at `id_accuracy` (%)."""
        return 100 * _sigmoid(self.slope * logit(id_accuracy / 100) + self.intercept)


def logit(p: float) -> float:
    if not 0 < p < 1:
        raise ValueError(f"logit: {p} is not strictly between 0 and 1")
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def effective_robustness(id_accuracy: float, ood_accuracy: float, fit: LinearFit) -> float:
    """OOD accuracy minus the fit's prediction from the ID accuracy, in percentage points (Taori et
    al. 2020, Sec. 3: rho(f) = acc_OOD(f) - beta(acc_ID(f)))."""
    return ood_accuracy - fit.predict(id_accuracy)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion, in %."""
    if n <= 0:
        return (0.0, 100.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


@dataclass
class ModelSpec:
    """One model of the report: its name, how to build it (called once, when its turn comes) and its
    WiSE-FT alpha when it is a point of a sweep."""

    name: str
    load: Callable[[], Flamingo]
    alpha: float | None = None


def task_accuracy(results: dict, task: str, shots: int) -> dict[str, Any]:
    """A task's top-1 accuracy (%, mean over trials), the queries scored and correct (pooled over
    trials) and their Wilson interval, from `evaluate`'s results."""
    cell = results["tasks"][task]["shots"][str(shots)]
    if not isinstance(cell.get("mean"), dict) or METRIC not in cell["mean"]:
        raise EvalDataError(f"task {task}: no {METRIC} score at {shots} shots (every query missing or out of context)")
    n = sum(t["ok"] for t in cell["trials"])
    correct = round(sum(t["scores"][METRIC] * t["ok"] / 100 for t in cell["trials"]))
    low, high = wilson_interval(correct, n)
    return {"accuracy": cell["mean"][METRIC], "n": n, "correct": correct, "interval": [low, high]}


def summarize(spec: ModelSpec, results: dict, id_task: str, ood_tasks: Sequence[str], shots: int,
              fits: dict[str, LinearFit]) -> dict[str, Any]:
    """One model's row: ID and OOD accuracies, their average and the effective robustness."""
    in_dist = task_accuracy(results, id_task, shots)
    ood: dict[str, Any] = {}
    for task in ood_tasks:
        entry = task_accuracy(results, task, shots)
        fit = fits.get(task)
        entry["predicted"] = fit.predict(in_dist["accuracy"]) if fit else None
        entry["effective_robustness"] = entry["accuracy"] - entry["predicted"] if fit else None
        ood[task] = entry
    robust = [e["effective_robustness"] for e in ood.values()]
    return {"model": spec.name, "alpha": spec.alpha, "id": {"task": id_task, **in_dist}, "ood": ood,
            "ood_average": statistics.fmean(e["accuracy"] for e in ood.values()),
            "effective_robustness_average": statistics.fmean(robust) if None not in robust else None}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")[-100:] or "model"


def run_robustness(models: Sequence[ModelSpec], data: DataConfig, settings: EvalSettings, out_dir: str | Path, *,
                   id_task: str = "imagenet", ood_tasks: Sequence[str] | None = None,
                   fits: dict[str, LinearFit] | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate every model on the ID task and the OOD tasks (default: the ImageNet shifts that the
    data config has) and write the report (module docstring) to `out_dir`; returns it."""
    fits = dict(fits or {})
    if ood_tasks is None:
        ood_tasks = [t for t in SHIFTS if t in data.tasks]
        if not ood_tasks:
            raise EvalDataError(f"{data.path}: no ImageNet shift ({', '.join(SHIFTS)}) in its tasks; name the OOD "
                                f"tasks to use (--ood)")
    tasks = [id_task, *ood_tasks]
    if len(set(tasks)) != len(tasks):
        raise EvalDataError(f"the ID and OOD tasks must differ, got {', '.join(tasks)}")
    for name in tasks:
        if get_task(name).kind != "classification":
            raise EvalDataError(f"task {name} is not a classification task; robustness compares top-1 accuracies")
        data.task(name)
    unknown = sorted(set(fits) - set(ood_tasks))
    if unknown:
        raise EvalDataError(f"a fit is given for {', '.join(unknown)}, which is not an OOD task of this run "
                            f"({', '.join(ood_tasks)})")
    if len(settings.shots) != 1:
        raise EvalDataError(f"shots: robustness compares one shot count, got {settings.shots}")
    slugs = [_slug(m.name) for m in models]
    if len(set(slugs)) != len(slugs) or not models:
        raise EvalDataError(f"models: expected distinct names, got {', '.join(m.name for m in models) or 'none'}")
    out_dir = Path(out_dir)
    rows = []
    for spec, slug in zip(models, slugs):
        model = spec.load().to(device)
        results = evaluate(model, tasks, data, settings, out_dir / "evals" / slug, model_name=spec.name,
                           progress=progress)
        del model
        gc.collect()
        assert results is not None, "robustness runs in one process"
        rows.append(summarize(spec, results, id_task, ood_tasks, settings.shots[0], fits))
    report = {"id_task": id_task, "ood_tasks": list(ood_tasks), "shots": settings.shots[0],
              "settings": settings.to_dict(), "data": str(data.path),
              "fits": {t: {"slope": f.slope, "intercept": f.intercept, "source": f.source} for t, f in fits.items()},
              "models": rows}
    write_text_atomic(out_dir / "robustness.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "robustness.md", markdown_table(report))
    plot(report, out_dir / "robustness.png")
    return report


def _pct(entry: dict) -> str:
    low, high = entry["interval"]
    return f"{entry['accuracy']:.1f} [{low:.0f}, {high:.0f}]"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def markdown_table(report: dict) -> str:
    ood = report["ood_tasks"]
    head = ["model", "alpha", f"{report['id_task']} (ID)", *ood, "OOD avg", *[f"ER {t}" for t in ood], "ER avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["models"]:
        cells = [row["model"], "" if row["alpha"] is None else f"{row['alpha']:g}", _pct(row["id"]),
                 *[_pct(row["ood"][t]) for t in ood], f"{row['ood_average']:.1f}",
                 *[_signed(row["ood"][t]["effective_robustness"]) for t in ood],
                 _signed(row["effective_robustness_average"])]
        lines.append("| " + " | ".join(cells) + " |")
    fits, first = report["fits"], report["models"][0]
    counts = [f"{report['id_task']} {first['id']['n']}", *[f"{t} {first['ood'][t]['n']}" for t in ood]]
    lines += ["", f"top-1 accuracy (%) at {report['shots']} shots [95% Wilson interval]; queries scored: "
              + ", ".join(counts) + ".",
              "ER: effective robustness, OOD accuracy minus logit(OOD) = slope * logit(ID) + intercept "
              + ("(" + "; ".join(f"{t}: {f['slope']:g}, {f['intercept']:g}, {f['source']}" for t, f in fits.items())
                 + ")" if fits else "(no fit given: -)") + "."]
    return "\n".join(lines) + "\n"


def _axis(values: Sequence[float]) -> tuple[float, float]:
    """Logit-axis limits around accuracies (%), kept inside (0.5, 99.5)."""
    low, high = max(0.5, min(values) * 0.8), min(99.5, 100 - (100 - max(values)) * 0.8)
    return logit(low / 100), logit(max(high, low + 1) / 100)


_TICKS = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99)  # accuracies (%) marked on the logit axes


def plot(report: dict, path: Path) -> None:
    """ID vs OOD accuracy in logit axes, one panel per OOD task and one for their average (of several): every model
    a point, the WiSE-FT sweep a curve in alpha order, the fit's line (when given) and y = x."""
    matplotlib = import_extra("matplotlib", "plot", "the robustness plot")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows, fits = report["models"], report["fits"]

    def line(*tasks: str) -> Callable[[float], float] | None:
        """The fits' prediction in logit axes; for several tasks, the logit of their mean prediction."""
        if not tasks or any(t not in fits for t in tasks):
            return None
        return lambda x: logit(statistics.fmean(
            _sigmoid(fits[t]["slope"] * x + fits[t]["intercept"]) for t in tasks))

    panels = [(t, [r["ood"][t]["accuracy"] for r in rows], line(t)) for t in report["ood_tasks"]]
    if len(report["ood_tasks"]) > 1:
        panels.append(("OOD average", [r["ood_average"] for r in rows], line(*report["ood_tasks"])))
    xs = [r["id"]["accuracy"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    clip = [min(99.5, max(0.5, v)) for v in xs]
    for ax, (title, ys, baseline) in zip(axes[0], panels):
        ys = [min(99.5, max(0.5, v)) for v in ys]
        x_lim, y_lim = _axis(clip), _axis(ys)
        grid = [x_lim[0] + (x_lim[1] - x_lim[0]) * i / 50 for i in range(51)]
        lo, hi = min(x_lim[0], y_lim[0]), max(x_lim[1], y_lim[1])
        ax.plot([lo, hi], [lo, hi], ls=":", c="grey", lw=1, label="y = x")
        if baseline is not None:
            ax.plot(grid, [baseline(g) for g in grid], c="C0", lw=1.5, label="fit (standard models)")
        sweep = sorted((r["alpha"], logit(x / 100), logit(y / 100)) for r, x, y in zip(rows, clip, ys)
                       if r["alpha"] is not None)
        if sweep:
            ax.plot([s[1] for s in sweep], [s[2] for s in sweep], marker="o", c="C3", label="WiSE-FT")
            for alpha, x, y in sweep:
                ax.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for r, x, y in zip(rows, clip, ys):
            if r["alpha"] is None:
                ax.scatter([logit(x / 100)], [logit(y / 100)], marker="D", zorder=3, label=r["model"])
        for setter, limit in ((ax.set_xticks, x_lim), (ax.set_yticks, y_lim)):
            shown = [t for t in _TICKS if limit[0] <= logit(t / 100) <= limit[1]]
            setter([logit(t / 100) for t in shown], [str(t) for t in shown])
        ax.set_xlim(*x_lim)
        ax.set_ylim(*y_lim)
        ax.set_title(title)
        ax.set_xlabel(f"{report['id_task']} top-1 (%, logit axis)")
        ax.set_ylabel("OOD top-1 (%, logit axis)")
        ax.grid(lw=0.4)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
