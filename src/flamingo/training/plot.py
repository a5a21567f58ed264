"""`flamingo plot RUN_DIR`: PNG figures of a run's metrics.jsonl (matplotlib, Agg backend).

- loss.png: the weighted objective and every dataset's loss against the update step;
- gates.png: tanh(alpha) of the attention and dense gates of every GATED XATTN-DENSE layer
  against the step (the paper's Figure 6 shows their absolute values growing with depth);
- optim.png: learning rate, gradient norm, tokens per second and skipped updates.
"""

from __future__ import annotations

from pathlib import Path

from flamingo.errors import UserError, import_extra
from flamingo.training.metrics import METRICS_FILE, read_metrics


class PlotError(UserError):
    """Nothing to plot (no run directory, no metrics)."""


def _series(records: list[dict], *keys: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value: object = r
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            xs.append(r["step"])
            ys.append(float(value))
    return xs, ys


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures (default into RUN_DIR/plots) and return their paths."""
    matplotlib = import_extra("matplotlib", "plot", "flamingo plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} does not exist")
    records = read_metrics(run_dir)
    if not records:
        raise PlotError(f"{run_dir / METRICS_FILE} holds no metrics yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    # losses
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(*_series(records, "loss"), label="objective (weighted sum)", color="black", linewidth=2)
    names = sorted({n for r in records for n in (r.get("losses") or {})})
    for name in names:
        ax.plot(*_series(records, "losses", name), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (NLL per token)")
    ax.set_title(f"training loss — {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # gates
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    layers = sorted({int(i) for r in records for i in ((r.get("gates") or {}).get("attn") or {})})
    cmap = plt.get_cmap("viridis")
    for ax, kind, title in ((axes[0], "attn", "cross-attention gate"), (axes[1], "ffw", "dense (FFW) gate")):
        for k, layer in enumerate(layers):
            colour = cmap(k / max(1, len(layers) - 1))
            ax.plot(*_series(records, "gates", kind, str(layer)), color=colour, label=f"layer {layer}")
        ax.set_title(f"tanh(alpha): {title}")
        ax.set_xlabel("step")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tanh(alpha)")
    if layers and len(layers) <= 16:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "gates.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # optimisation
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key, label in ((axes[0, 0], "lr", "learning rate"), (axes[0, 1], "grad_norm", "gradient norm (before clipping)"),
                           (axes[1, 0], "tokens_per_s", "tokens / s"), (axes[1, 1], "skipped_steps", "skipped updates (total)")):
        ax.plot(*_series(records, key))
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "optim.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
