"""`flamingo robustness`: ID and OOD accuracy, their average and the effective robustness of models or
of a WiSE-FT sweep (`flamingo.evaluation.robustness`; the sweep's models are written by
`flamingo.training.wise_ft`, one at a time, and removed once loaded)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flamingo.cli_options import (
    MAX_SHOTS,
    add_trust_remote_code_option,
    int_range,
    load_model_quietly,
    positive_int,
    seed,
    torch_device,
)
from flamingo.errors import UserError

if TYPE_CHECKING:
    from flamingo.model.flamingo import Flamingo

EPILOG = """examples:
  flamingo robustness --model of-9b --data data.yaml --out runs/robust        # ImageNet + the shifts in data.yaml
  flamingo robustness --wise embedded runs/ft/final --alphas 0:1:0.1 --data data.yaml --out runs/wise \\
      --fit imagenetv2=SLOPE,INTERCEPT
  flamingo robustness --model of-9b --data data.yaml --out runs/robust \\
      --fit-from robustness_top1s.csv --fit-models standard_models.txt   # fits on Taori et al.'s testbed
  flamingo robustness --wise embedded runs/shift-ft/final --alphas 0,0.25,0.5,0.75,1 --id shapes \\
      --ood shapes_sketch --data runs/shapes-shift/data.yaml --out runs/shift-wise
outputs in --out: evals/MODEL/ (each model's flamingo eval output, resumable), robustness.json,
robustness.md, robustness.png. A fit is logit(OOD) = SLOPE * logit(ID) + INTERCEPT on accuracies as
fractions; none is built in (see the robustness guide). With --id imagenet, ImageNet-R, -A and
ObjectNet are paired with ImageNet's accuracy on their own classes (tasks imagenet_on_r_classes,
imagenet_on_a_classes, imagenet_on_objectnet_classes, evaluated too), as the testbed pairs them."""


def alphas(text: str) -> list[float]:
    """"0:1:0.1" (start:stop:step, stop included) or "0,0.5,1"."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step))
            values = [round(start + i * step, 10) for i in range(count + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP (step > 0) or comma-separated numbers, "
                                         f"got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct alphas in [0, 1], got {text!r}")
    return values


def fit(text: str) -> tuple[str, float, float]:
    task, _, numbers = text.partition("=")
    try:
        slope, intercept = (float(v) for v in numbers.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=SLOPE,INTERCEPT, got {text!r}") from None
    return task.strip(), slope, intercept


def _cmd_robustness(args: argparse.Namespace) -> None:
    from flamingo.data.benchmarks.data_config import load_data_config
    from flamingo.data.benchmarks.tasks import get_task
    from flamingo.errors import import_extra
    from flamingo.evaluation.robustness import (
        TESTBED_COLUMNS,
        LinearFit,
        ModelSpec,
        default_ood_tasks,
        fit_from_testbed,
        run_robustness,
    )
    from flamingo.evaluation.settings import EvalSettings

    import_extra("matplotlib", "eval", "flamingo robustness")  # flamingo eval's results.png, and the plot
    if not args.model and not args.wise:
        raise UserError("give the models to compare: --model (repeatable) and/or --wise BASE FINETUNED")
    if args.wise and not args.alphas:
        raise UserError("--wise needs --alphas (e.g. 0:1:0.1)")
    if args.alphas and not args.wise:
        raise UserError("--alphas is the sweep of --wise BASE FINETUNED")
    data = load_data_config(args.data)
    ood = [t.strip() for t in args.ood.split(",") if t.strip()] if args.ood else None
    for name in [args.id, *(ood or [])]:
        get_task(name)
    fits = {}
    for task, slope, intercept in args.fit:
        get_task(task)
        fits[task] = LinearFit(slope, intercept, "--fit")
    if args.fit_models and not args.fit_from:
        raise UserError("--fit-models names the models of the --fit-from table to fit over")
    if args.fit_from:
        if args.id != "imagenet":
            raise UserError(f"--fit-from: the testbed's lines are fitted against ImageNet accuracies; the ID task "
                            f"is {args.id}, not imagenet")
        shifts = [t for t in (ood if ood is not None else default_ood_tasks(data)) if t in TESTBED_COLUMNS]
        if not shifts:
            raise UserError(f"--fit-from: the testbed fits {', '.join(TESTBED_COLUMNS)}, none of which is an OOD "
                            f"task of this run")
        both = sorted(set(shifts) & set(fits))
        if both:
            raise UserError(f"both --fit and --fit-from give a fit for {', '.join(both)}")
        table = fit_from_testbed(args.fit_from, shifts, args.fit_models)
        print(f"fits from {args.fit_from}, "
              + ("over the models of --fit-models:" if args.fit_models else
                 "over EVERY model of the table (no --fit-models: not only standard ImageNet models):"))
        for task, line in table.items():
            print(f"  {task}: slope {line.slope:.4f}, intercept {line.intercept:.4f}: {line.source}")
        fits.update(table)
    settings = EvalSettings(shots=[args.shots], trials=args.trials, support_size=args.support_size,
                            query_size=args.max_queries, seed=args.seed, batch_size=args.batch_size)
    settings.validate()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [ModelSpec(spec, lambda spec=spec: load_model_quietly(spec, args.trust_remote_code))
              for spec in args.model]
    if args.wise:
        base, tuned = args.wise
        scratch = Path(args.out) / "wise-ft-models"
        models += [ModelSpec(f"wise-ft alpha={alpha:g}", _wise_loader(base, tuned, alpha, scratch, args), alpha)
                   for alpha in args.alphas]
    report = run_robustness(models, data, settings, args.out, id_task=args.id, ood_tasks=ood, fits=fits,
                            device=device, progress=not args.no_progress)
    print((Path(args.out) / "robustness.md").read_text(), end="")
    print(f"report: {Path(args.out) / 'robustness.json'}, plot: {Path(args.out) / 'robustness.png'} "
          f"({len(report['models'])} models)")


def _wise_loader(base: str, tuned: str, alpha: float, scratch: Path,
                 args: argparse.Namespace) -> Callable[[], Flamingo]:
    """Builds the WiSE-FT model at `alpha` with `flamingo wise-ft`'s code, loads it and removes its folder."""
    def load() -> Flamingo:
        from flamingo.model.weights import model_directory
        from flamingo.training.wise_ft import wise_ft

        out = wise_ft(model_directory(base), model_directory(tuned), alpha, scratch / f"alpha-{alpha:g}",
                      overwrite=True, trust_remote_code=args.trust_remote_code, force=args.force,
                      zero_shot_spec=base, fine_tuned_spec=tuned)
        try:
            return load_model_quietly(str(out), args.trust_remote_code)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if scratch.is_dir() and not any(scratch.iterdir()):
                scratch.rmdir()
    return load


def register(sub: argparse._SubParsersAction) -> None:
    from flamingo.evaluation.settings import MAX_BATCH_SIZE

    p = sub.add_parser("robustness", help="ID vs OOD accuracy and effective robustness of models or a WiSE-FT sweep",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--model", action="append", default=[], help="a model to evaluate (repeatable): a saved model "
                   "directory, a hub id of one, or a config file")
    p.add_argument("--wise", nargs=2, metavar=("BASE", "FINETUNED"),
                   help="a WiSE-FT sweep between a zero-shot model and its fine-tuned version")
    p.add_argument("--alphas", type=alphas, default=None, help="the sweep's alphas: START:STOP:STEP or a list")
    p.add_argument("--force", action="store_true", help="--wise: interpolate models whose relation is not "
                   "recorded (as flamingo wise-ft --force)")
    p.add_argument("--data", required=True, type=Path, help="YAML file with each task's annotation and media paths")
    p.add_argument("--out", required=True, type=Path, help="output directory (reused to resume)")
    p.add_argument("--id", default="imagenet", help="the in-distribution task (default imagenet)")
    p.add_argument("--ood", default=None, help="OOD tasks, comma-separated (default: the ImageNet shifts in --data)")
    p.add_argument("--fit", type=fit, action="append", default=[], metavar="TASK=SLOPE,INTERCEPT",
                   help="the linear fit of standard models for an OOD task, in logit axes (repeatable)")
    p.add_argument("--fit-from", type=Path, default=None, metavar="CSV",
                   help="fit each ImageNet shift's line on Taori et al.'s testbed table (robustness_top1s.csv)")
    p.add_argument("--fit-models", type=Path, default=None, metavar="FILE",
                   help="--fit-from: fit over these models only (one name a line; the testbed's standard models); "
                        "default: every model of the table")
    p.add_argument("--shots", type=int_range(0, MAX_SHOTS), default=0, help="shots per prompt (default 0)")
    p.add_argument("--trials", type=int_range(1, 1000), default=1, help="random demo draws (default 1)")
    p.add_argument("--support-size", type=positive_int, default=2048, help="support set size (default 2048)")
    p.add_argument("--max-queries", type=positive_int, default=None,
                   help="a seeded subset of this many queries per task")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE), default=8, help="queries per forward pass")
    p.add_argument("--device", type=torch_device, default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_trust_remote_code_option(p)
    p.set_defaults(func=_cmd_robustness)
