"""Results: per (shots, trial) scores from the records, mean and std over trials, and the three
outputs: results.json (with the exact settings and seeds), results.md (a table like the paper's)
and results.png (score vs shots per task, as the paper's Figure 2, centre)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from flamingo.data.benchmarks.samples import Sample
from flamingo.data.benchmarks.tasks import TaskSpec
from flamingo.errors import import_extra
from flamingo.evaluation.aggregate import score_records
from flamingo.outputs import write_text_atomic


def summarize(task: TaskSpec, records: list[dict], queries: list[Sample], pairs: list[tuple[int, int]],
              trial_info: dict[tuple[int, int], dict[str, Any]], notes: list[str], support_size: int) -> dict:
    by_id = {q.id: q for q in queries}
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["shots"], r["trial"]), []).append(r)
    shots_out: dict[str, Any] = {}
    for shots in sorted({s for s, _ in pairs}):
        trials = []
        for s, t in pairs:
            if s != shots:
                continue
            recs = groups.get((s, t), [])
            counts = {k: sum(r["status"] == k for r in recs) for k in ("ok", "missing", "ooc")}
            entry: dict[str, Any] = {"trial": t, **counts, **trial_info.get((s, t), {})}
            # A prompt longer than the LM's context makes the whole cell "OOC", as in the paper.
            entry["scores"] = "OOC" if counts["ooc"] else score_records(task, recs, by_id)
            trials.append(entry)
        scored = [t["scores"] for t in trials if isinstance(t["scores"], dict) and t["scores"]]
        cell: dict[str, Any] = {"trials": trials}
        if any(t["scores"] == "OOC" for t in trials):
            cell["mean"] = "OOC"
        elif scored:
            names = list(scored[0])
            cell["mean"] = {n: statistics.fmean(s[n] for s in scored) for n in names}
            cell["std"] = {n: statistics.pstdev([s[n] for s in scored]) if len(scored) > 1 else 0.0 for n in names}
        shots_out[str(shots)] = cell
    missing = sorted({r["id"] for r in records if r["status"] == "missing"})
    return {"metric": next(iter(_first_scores(shots_out)), task.metric), "kind": task.kind,
            "open_ended": task.open_ended, "video": task.video, "queries": len(queries),
            "support": support_size, "missing_media": {"count": len(missing), "ids": missing[:100]},
            "notes": notes, "shots": shots_out}


def _first_scores(shots_out: dict) -> dict:
    for cell in shots_out.values():
        if isinstance(cell.get("mean"), dict):
            return cell["mean"]
    return {}


def _cell(cell: dict, metric: str) -> str:
    mean = cell.get("mean")
    if mean == "OOC":
        return "OOC"
    if not isinstance(mean, dict) or metric not in mean:
        return "-"
    std = cell.get("std", {}).get(metric, 0.0)
    return f"{mean[metric]:.1f} ± {std:.1f}" if len(cell["trials"]) > 1 else f"{mean[metric]:.1f}"


def markdown_table(results: dict) -> str:
    shots = sorted({int(s) for t in results["tasks"].values() for s in t["shots"]})
    lines = ["| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for name, task in results["tasks"].items():
        metric = task["metric"]
        cells = [_cell(task["shots"][str(s)], metric) if str(s) in task["shots"] else "" for s in shots]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    s = results["settings"]
    lines.append("")
    lines.append(f"mean ± std over {s['trials']} trial(s); demos: {'RICES' if s['rices'] else 'random'}"
                 f"{', ensembled over ' + str(s['ensemble_size']) + ' orders (close-ended)' if s['ensemble'] else ''}; "
                 f"split: {s['split']}; OOC: prompt longer than the LM's context.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    matplotlib = import_extra("matplotlib", "eval", "the results plot of flamingo eval")

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks):
        metric = task["metric"]
        xs, ys, errs = [], [], []
        for shots, cell in sorted(task["shots"].items(), key=lambda kv: int(kv[0])):
            if isinstance(cell.get("mean"), dict) and metric in cell["mean"]:
                xs.append(int(shots))
                ys.append(cell["mean"][metric])
                errs.append(cell["std"][metric])
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3)
        ax.set_title(name)
        ax.set_xlabel("shots")
        ax.set_ylabel(metric)
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(out_dir: Path, results: dict) -> None:
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out_dir / "results.md", markdown_table(results))
    plot(results, out_dir / "results.png")
