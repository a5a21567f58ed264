"""Robustness under distribution shift, measured as the CLIP / WiSE-FT line of work does: each model's
accuracy in distribution (ID: ImageNet) and on shifted test sets (OOD: ImageNetV2, ImageNet-R,
ImageNet-Sketch, ImageNet-A, ObjectNet, or any classification tasks), their average, and the
*effective robustness*: the OOD accuracy above what the ID accuracy predicts (Taori et al. 2020,
"Measuring Robustness to Natural Distribution Shifts in Image Classification", NeurIPS).

The prediction is a linear fit in logit-scaled axes, logit(OOD) = slope * logit(ID) + intercept
(logit(p) = ln(p / (1 - p)), accuracies as fractions), which Taori et al. fit over the standard
ImageNet models of their testbed (trained on ImageNet-1k alone, without robustness interventions;
published as per-model data and plots at modestyachts.github.io/imagenet-testbed). No coefficients
are built in: the paper publishes its fits as lines in its figures and as the testbed's data, not
as numbers, and this code carries no number it cannot trace to a publication. A fit is given per
shift (`LinearFit`; `--fit TASK=SLOPE,INTERCEPT`) or refitted from the testbed's published table
(`fit_from_testbed`; `--fit-from robustness_top1s.csv`, optionally `--fit-models` with the names of
the standard models): per shift, least squares of logit(OOD) on logit(ID) over the table's models,
with the columns of `TESTBED_COLUMNS`. Without a fit, a shift's effective robustness is null and
its plot shows the y = x line only.

ImageNet-R, ImageNet-A and ObjectNet cover a subset of ImageNet's classes (and are ranked among
them), so the testbed pairs their accuracy with ImageNet's accuracy on the same classes
(`val-on-imagenet-r-classes` etc.), and so does this code when the ID task is `imagenet`: the
tasks of `ID_ON_SHIFT_CLASSES` (ImageNet val restricted to the shift's classes, which are the
candidates) are evaluated too, and each shift's prediction is made from its paired ID accuracy.
The average OOD accuracy is plotted against ImageNet's accuracy, as WiSE-FT plots it; its
effective robustness is the mean of the shifts' (each against its paired ID accuracy), i.e. the
average OOD accuracy minus the mean of the shifts' predictions.

Every model is evaluated with `flamingo.evaluation.evaluate` (one resumable output directory per
model under OUT/evals/), so its scores are exactly what `flamingo eval` reports for it. The
report: robustness.json, robustness.md (a table) and robustness.png (ID vs OOD accuracy in logit
axes per shift and for the average, with the fit line and the WiSE-FT curve in alpha order).
Intervals are 95% Wilson score intervals over the queries scored (pooled over trials).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flamingo.data.benchmarks.data_config import DataConfig, TaskData
from flamingo.data.benchmarks.samples import EvalDataError
from flamingo.data.benchmarks.tasks import get_task
from flamingo.errors import UserError, import_extra
from flamingo.evaluation.settings import EvalSettings
from flamingo.evaluation.suite import evaluate
from flamingo.model.flamingo import Flamingo
from flamingo.outputs import write_text_atomic

SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet")
METRIC = "top-1"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# The ImageNet task on a shift's classes, paired with the shift when the ID task is imagenet (module docstring).
ID_ON_SHIFT_CLASSES = {"imagenet_r": "imagenet_on_r_classes", "imagenet_a": "imagenet_on_a_classes",
                       "objectnet": "imagenet_on_objectnet_classes"}
# Taori et al.'s testbed table (modestyachts/imagenet-testbed, robustness_top1s.csv: a row per model, a column
# per evaluation setting, top-1 in %): each shift's (OOD column, ID column it is fitted against). ImageNetV2 is
# its matched-frequency variant, the one the WiSE-FT / CLIP papers report.
TESTBED_COLUMNS = {
    "imagenetv2": ("imagenetv2-matched-frequency-format-val", "val"),
    "imagenet_sketch": ("imagenet-sketch", "val"),
    "imagenet_r": ("imagenet-r", "val-on-imagenet-r-classes"),
    "imagenet_a": ("imagenet-a", "val-on-imagenet-a-classes"),
    "objectnet": ("objectnet-1.0-beta", "val-on-objectnet-classes"),
}
MIN_FIT_MODELS = 3


@dataclass(frozen=True)
class LinearFit:
    """logit(OOD accuracy) = slope * logit(ID accuracy) + intercept, accuracies as fractions."""

    slope: float
    intercept: float
    source: str = "given"

    def predict(self, id_accuracy: float) -> float:
        """The OOD accuracy (%) the fit predicts at `id_accuracy` (%); at 0 or 100, the line's limit."""
        p = id_accuracy / 100
        if p in (0, 1):  # logit(ID) is -inf or +inf: slope * logit(ID) goes to -inf, +inf or stays 0
            towards = self.slope if p == 1 else -self.slope
            return 100 * _sigmoid(self.intercept) if towards == 0 else (100.0 if towards > 0 else 0.0)
        return 100 * _sigmoid(self.slope * logit(p) + self.intercept)


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


def read_model_list(path: str | Path) -> list[str]:
    """Model names, one a line (blank lines and lines starting with # skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"model list {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise UserError(f"model list {path}: no model names (one a line)")
    return names


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _testbed_cell(path: Path, line: int, model: str, column: str, cell: str) -> float | None:
    """A cell of the testbed table as an accuracy in %, None when empty (the setting was not evaluated)."""
    if not cell.strip():
        return None
    try:
        value = float(cell)
    except ValueError:
        raise UserError(f"{path}: line {line} (model {model!r}), column {column!r}: {cell.strip()[:40]!r} is not "
                        f"a number") from None
    if not 0 < value < 100:
        raise UserError(f"{path}: line {line} (model {model!r}), column {column!r}: accuracy {value:g} is not "
                        f"strictly between 0 and 100 (%)")
    return value


def fit_from_testbed(path: str | Path, tasks: Sequence[str] = SHIFTS,
                     models_file: str | Path | None = None) -> dict[str, LinearFit]:
    """Each shift's line, fitted on Taori et al.'s published per-model accuracies (their testbed's
    robustness_top1s.csv): least squares of logit(OOD) on logit(ID), accuracies as fractions, with
    the columns of `TESTBED_COLUMNS`, over the models named in `models_file` (one a line: for
    Taori et al.'s fits, the testbed's standard models) or, without one, over every row with both
    values. Each fit's `source` names the file, its sha256, the columns and the models used."""
    path = Path(path)
    unknown = [t for t in tasks if t not in TESTBED_COLUMNS]
    if unknown:
        raise UserError(f"the testbed has no column for {', '.join(unknown)} (it fits {', '.join(TESTBED_COLUMNS)})")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"testbed table {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip() for h in rows[0]] if rows else []
    if "model" not in header:
        raise UserError(f"{path}: no 'model' column in the header; expected the testbed's robustness_top1s.csv "
                        f"(a row per model, a column per evaluation setting)")
    for task in tasks:
        for column in TESTBED_COLUMNS[task]:
            if column not in header:
                raise UserError(f"{path}: no column {column!r}, which the {task} fit needs; expected the testbed's "
                                f"robustness_top1s.csv")
    index = {name: i for i, name in enumerate(header)}
    table: dict[str, tuple[int, list[str]]] = {}
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path}: line {line} has {len(row)} cells, the header {len(header)}")
        name = row[index["model"]].strip()
        if not name or name in table:
            raise UserError(f"{path}: line {line}: {'a second row for model ' + repr(name) if name else 'no model name'}")
        table[name] = (line, row)
    if models_file is None:
        chosen = list(table)
        which = (f"every model of {path.name} with both values (not only standard ImageNet models: Taori et al. "
                 f"fit those alone; give their names)")
    else:
        chosen = read_model_list(models_file)
        absent = [m for m in chosen if m not in table]
        if absent:
            raise UserError(f"model list {models_file}: {len(absent)} name(s) are no model of {path}: "
                            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        which = f"the models listed in {Path(models_file).name} (sha256 {_sha256(Path(models_file).read_bytes())})"
    fits = {}
    for task in tasks:
        ood_column, id_column = TESTBED_COLUMNS[task]
        xs, ys = [], []
        for model in dict.fromkeys(chosen):
            line, row = table[model]
            id_value, ood_value = (_testbed_cell(path, line, model, c, row[index[c]]) for c in (id_column, ood_column))
            if id_value is not None and ood_value is not None:
                xs.append(logit(id_value / 100))
                ys.append(logit(ood_value / 100))
        if len(xs) < MIN_FIT_MODELS or len(set(xs)) < 2:
            raise UserError(f"{path}: {task}: {len(xs)} model(s) of {which} have both {id_column!r} and "
                            f"{ood_column!r}{' (all at one ID accuracy)' if len(xs) >= MIN_FIT_MODELS else ''}; "
                            f"a fit needs at least {MIN_FIT_MODELS} at different ID accuracies")
        slope, intercept = statistics.linear_regression(xs, ys)
        fits[task] = LinearFit(slope, intercept, f"least squares of logit({ood_column}) on logit({id_column}) over "
                                                 f"{len(xs)} models: {which}; {path.name} sha256 {_sha256(data)}")
    return fits


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
              fits: dict[str, LinearFit], pairs: dict[str, str] | None = None) -> dict[str, Any]:
    """One model's row: ID and OOD accuracies, their average and the effective robustness. `pairs`:
    {OOD task: the ID task its prediction is made from} (default and absent tasks: `id_task`)."""
    pairs = pairs or {}
    in_dist = task_accuracy(results, id_task, shots)
    paired = {t: task_accuracy(results, t, shots) for t in dict.fromkeys(pairs.values()) if t != id_task}
    ood: dict[str, Any] = {}
    for task in ood_tasks:
        entry = task_accuracy(results, task, shots)
        entry["id_task"] = pairs.get(task, id_task)
        id_accuracy = paired[entry["id_task"]]["accuracy"] if entry["id_task"] != id_task else in_dist["accuracy"]
        fit = fits.get(task)
        entry["predicted"] = fit.predict(id_accuracy) if fit else None
        entry["effective_robustness"] = entry["accuracy"] - entry["predicted"] if fit else None
        ood[task] = entry
    predicted = [e["predicted"] for e in ood.values()]
    robust = [e["effective_robustness"] for e in ood.values()]
    return {"model": spec.name, "alpha": spec.alpha, "id": {"task": id_task, **in_dist}, "paired_id": paired,
            "ood": ood, "ood_average": statistics.fmean(e["accuracy"] for e in ood.values()),
            "ood_average_predicted": statistics.fmean(predicted) if None not in predicted else None,
            "effective_robustness_average": statistics.fmean(robust) if None not in robust else None}


def default_ood_tasks(data: DataConfig) -> list[str]:
    """The ImageNet shifts that the data config has."""
    tasks = [t for t in SHIFTS if t in data.tasks]
    if not tasks:
        raise EvalDataError(f"{data.path}: no ImageNet shift ({', '.join(SHIFTS)}) in its tasks; name the OOD "
                            f"tasks to use (--ood)")
    return tasks


def paired_id_tasks(id_task: str, ood_tasks: Sequence[str]) -> dict[str, str]:
    """{OOD task: the ID task its effective robustness is measured against}: ImageNet on the shift's
    classes for ImageNet-R, -A and ObjectNet when the ID task is imagenet, else the ID task."""
    return {t: ID_ON_SHIFT_CLASSES[t] if id_task == "imagenet" and t in ID_ON_SHIFT_CLASSES else id_task
            for t in ood_tasks}


def _with_paired_tasks(data: DataConfig, id_task: str, pairs: dict[str, str]) -> DataConfig:
    """The data config with an entry for every paired ID task it lacks: the ID task's files (ImageNet's
    val and train folders), plus the shift's mapping files for ObjectNet."""
    tasks = dict(data.tasks)
    for ood, paired in pairs.items():
        if paired == id_task or paired in tasks:
            continue
        base = data.task(id_task)
        annotations = data.task(ood).test.annotations if "annotations" in get_task(paired).fields else None
        tasks[paired] = TaskData(replace(base.test, annotations=annotations),
                                 replace(base.train, annotations=annotations) if base.train is not None else None)
    return DataConfig(data.path, tasks)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")[-100:] or "model"


def run_robustness(models: Sequence[ModelSpec], data: DataConfig, settings: EvalSettings, out_dir: str | Path, *,
                   id_task: str = "imagenet", ood_tasks: Sequence[str] | None = None,
                   fits: dict[str, LinearFit] | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate every model on the ID task and the OOD tasks (default: the ImageNet shifts that the
    data config has) and write the report (module docstring) to `out_dir`; returns it."""
    fits = dict(fits or {})
    if ood_tasks is None:
        ood_tasks = default_ood_tasks(data)
    if len({id_task, *ood_tasks}) != 1 + len(ood_tasks):
        raise EvalDataError(f"the ID and OOD tasks must differ, got {', '.join([id_task, *ood_tasks])}")
    pairs = paired_id_tasks(id_task, ood_tasks)
    data = _with_paired_tasks(data, id_task, pairs)
    tasks = list(dict.fromkeys([id_task, *pairs.values(), *ood_tasks]))
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
        rows.append(summarize(spec, results, id_task, ood_tasks, settings.shots[0], fits, pairs))
    report = {"id_task": id_task, "ood_tasks": list(ood_tasks), "id_pairs": pairs, "shots": settings.shots[0],
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


def _paired_tasks(report: dict) -> list[str]:
    return [t for t in dict.fromkeys(report["id_pairs"].values()) if t != report["id_task"]]


def markdown_table(report: dict) -> str:
    ood, paired = report["ood_tasks"], _paired_tasks(report)
    head = ["model", "alpha", f"{report['id_task']} (ID)", *[f"{t} (ID)" for t in paired], *ood, "OOD avg",
            *[f"ER {t}" for t in ood], "ER avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["models"]:
        cells = [row["model"], "" if row["alpha"] is None else f"{row['alpha']:g}", _pct(row["id"]),
                 *[_pct(row["paired_id"][t]) for t in paired], *[_pct(row["ood"][t]) for t in ood],
                 f"{row['ood_average']:.1f}", *[_signed(row["ood"][t]["effective_robustness"]) for t in ood],
                 _signed(row["effective_robustness_average"])]
        lines.append("| " + " | ".join(cells) + " |")
    fits, first = report["fits"], report["models"][0]
    counts = [f"{report['id_task']} {first['id']['n']}", *[f"{t} {first['paired_id'][t]['n']}" for t in paired],
              *[f"{t} {first['ood'][t]['n']}" for t in ood]]
    lines += ["", f"top-1 accuracy (%) at {report['shots']} shots [95% Wilson interval]; queries scored: "
              + ", ".join(counts) + ".",
              "ER: effective robustness, the OOD accuracy minus the fit's prediction, logit(OOD) = slope * logit(ID) "
              "+ intercept, with ID: " + "".join(f"{t} for {o}; " for o, t in report["id_pairs"].items()
                                                 if t != report["id_task"])
              + f"{report['id_task']}{' for the others' if paired else ''} (ER avg: the mean of the ER). Fits: "
              + ("; ".join(f"{t}: {f['slope']:g}, {f['intercept']:g} ({f['source']})" for t, f in fits.items())
                 if fits else "none given (-)") + "."]
    return "\n".join(lines) + "\n"


def _axis(values: Sequence[float]) -> tuple[float, float]:
    """Logit-axis limits around accuracies (%), kept inside (0.5, 99.5)."""
    low, high = max(0.5, min(values) * 0.8), min(99.5, 100 - (100 - max(values)) * 0.8)
    return logit(low / 100), logit(max(high, low + 1) / 100)


def _clip(values: Sequence[float]) -> list[float]:
    """Accuracies (%) kept inside (0.5, 99.5), where the logit axes end."""
    return [min(99.5, max(0.5, v)) for v in values]


_TICKS = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99)  # accuracies (%) marked on the logit axes


def plot(report: dict, path: Path) -> None:
    """ID vs OOD accuracy in logit axes, one panel per OOD task (against its paired ID accuracy) and one for their
    average (of several, against the ID task's): every model a point, the WiSE-FT sweep a curve in alpha order,
    the fit's line (when given) and y = x."""
    matplotlib = import_extra("matplotlib", "plot", "the robustness plot")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows, fits, id_task = report["models"], report["fits"], report["id_task"]

    def id_accuracies(task: str) -> list[float]:
        return [r["id"]["accuracy"] if task == id_task else r["paired_id"][task]["accuracy"] for r in rows]

    def line(*tasks: str) -> Callable[[float], float] | None:
        """The fits' prediction in logit axes; for several tasks, the logit of their mean prediction."""
        if not tasks or any(t not in fits for t in tasks):
            return None
        return lambda x: logit(statistics.fmean(
            _sigmoid(fits[t]["slope"] * x + fits[t]["intercept"]) for t in tasks))

    # (title, x task, ID accuracies, OOD accuracies, the fit's line, the fits' prediction per model)
    panels = [(t, report["id_pairs"][t], id_accuracies(report["id_pairs"][t]), [r["ood"][t]["accuracy"] for r in rows],
               line(t), None) for t in report["ood_tasks"]]
    if len(report["ood_tasks"]) > 1:
        # Against the ID task's accuracy, as WiSE-FT plots it. With shifts paired with ImageNet on their classes,
        # the fits predict the average from several ID accuracies: no line in these axes, a point per model.
        unpaired = all(t == id_task for t in report["id_pairs"].values())
        predicted = [r["ood_average_predicted"] for r in rows]
        panels.append(("OOD average", id_task, id_accuracies(id_task), [r["ood_average"] for r in rows],
                       line(*report["ood_tasks"]) if unpaired else None,
                       predicted if not unpaired and None not in predicted else None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, x_task, xs, ys, baseline, predicted) in zip(axes[0], panels):
        clip, ys, predicted = _clip(xs), _clip(ys), _clip(predicted) if predicted is not None else None
        x_lim, y_lim = _axis(clip), _axis(ys + (predicted or []))
        grid = [x_lim[0] + (x_lim[1] - x_lim[0]) * i / 50 for i in range(51)]
        lo, hi = min(x_lim[0], y_lim[0]), max(x_lim[1], y_lim[1])
        ax.plot([lo, hi], [lo, hi], ls=":", c="grey", lw=1, label="y = x")
        if baseline is not None:
            ax.plot(grid, [baseline(g) for g in grid], c="C0", lw=1.5, label="fit (standard models)")
        if predicted is not None:
            ax.scatter([logit(x / 100) for x in clip], [logit(v / 100) for v in predicted],
                       marker="o", facecolors="none", edgecolors="C0", label="fits' prediction (paired ID)")
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
        ax.set_xlabel(f"{x_task} top-1 (%, logit axis)")
        ax.set_ylabel("OOD top-1 (%, logit axis)")
        ax.grid(lw=0.4)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
