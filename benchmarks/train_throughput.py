"""Training throughput: full optimizer steps, ours (`flamingo.training.Trainer`) vs OpenFlamingo's
own `train_one_epoch`, on an identical small configuration; plus model FLOPs utilisation.

Models (as benchmarks/train_step.py): both wrap the same random Llama-architecture LM (SmolLM-like:
vocabulary 49,152, tied input/output embeddings as SmolLM2 and OpenFlamingo's MPT LMs, hidden 512,
8 blocks; built locally), the same frozen random CLIP tower (224 px, patch 32, width 256, one
shared instance, called on pixels by both), OpenFlamingo's bridge sizes (resampler depth 6,
64 latents, 8x64 heads; gated xattn 8x64 heads before every 2nd block). OpenFlamingo's trainable
weights (tanh gates opened) are copied into ours and both compute the same losses (checked).
fp32 on CPU, the same torch thread count for both (default 1: on a shared 2-core machine, 2 threads
per process collapse as soon as anything else runs: one of our steps took 5.0 s with 1 thread and
12.9-30.5 s with 2 while another benchmark was running; `--threads 2` on a quiet machine).

One optimizer step, both sides, is what OpenFlamingo's `train_one_epoch` does per step: a LAION
batch (image-text pairs: 4 x 32 tokens, right-padded, 1 image each) and an MMC4 batch (interleaved:
4 x 256 tokens, 3 images each), each forwarded and backpropagated (LAION loss x 0.2, MMC4 x 1.0),
then clipping at 1.0, AdamW (lr 1e-4, weight decay 0.1), the constant-with-warmup schedule (5000
warm-up steps) and zeroing of the gradients. The same two fixed batches are fed every step.

- Ours: a `TrainConfig` over the same model (`Trainer(config, model=..., sources=...)`) with two
  datasets, "laion" (weight 0.2) and "mmc4" (weight 1.0), each an in-memory source that yields
  the same `flamingo.data.batch.Batch` forever; one step = `Trainer.train_step()` (objective
  "accumulate": both datasets every update, as OpenFlamingo). Its AdamW groups are its defaults
  (the paper's: decay everything but the resampler).
- OpenFlamingo: `open_flamingo.train.train_utils.train_one_epoch` itself, from the installed
  open-flamingo 2.0.1 wheel (`wandb` stubbed: it only logs when report_to_wandb), called for an
  "epoch" of one step, with fp32, no FSDP, gradient_accumulation_steps 1,
  freeze_lm_embeddings False (its default: the gradient of the whole input-embedding table is
  computed and then masked to the `<image>` / `<|endofchunk|>` rows), loss multipliers 0.2 / 1.0,
  rank != 0 so its tqdm bar and console logging are off. Its model is wrapped in a pass-through
  module with `.module` (what DDP looks like to it, without DDP's all-reduce: one process). The
  optimizer and scheduler are built exactly as its train.py does for the non-FSDP path: AdamW over
  the trainable named parameters, weight decay only on names containing "gated_cross_attn" (the
  resampler and the embedding table get none), `get_constant_schedule_with_warmup`. Its per-step
  label making (pad / `<image>` masked; MMC4: tokens before the first `<image>` and between an
  `<|endofchunk|>` and the next `<image>` masked, a Python loop) is part of its step and timed.
  Our labels come from the data pipeline instead; the benchmark gives ours exactly the labels
  OpenFlamingo computed (captured from its first step), so both train on the same targets.

Tokens/s counts *training tokens*: the label positions that are next-token targets (labels
shifted by one, != -100), summed over both batches; the same count on both sides (input tokens,
all non-padding positions, are printed too). Throughput ratio = OpenFlamingo step time / our step
time (same tokens per step).

Timing: one warm-up step each, then reps of (ours step, OF step, large matmul) in one process,
order alternated every rep; the machine may be shared, so the headline is the median of the
per-rep ratios (each rep's runs are adjacent in time); medians of each are printed too. Other
processes' CPU use during each rep is measured and reported (`--max-contention` drops busy reps).

MFU: FLOPs of one step of each side counted with `torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions, attention: CPU flash SDPA counted with the usual 4*b*h*Sq*Sk*d forward /
2x that backward formula, causal masking not discounted; elementwise ops and the optimizer not
counted). A `--matmul`-sized fp32 square matmul is timed in every rep with the same threads;
MFU = (model FLOPs per step / step time) / matmul FLOP/s, per rep, median. "Model FLOPs" =
the FLOPs this training step needs: our counted FLOPs (forward, backward through the frozen LM's
activations, weight gradients of the bridge and the two new token rows only). OpenFlamingo also
executes the weight gradient of the whole (tied) embedding table, which it then masks; its own
count is reported as "executed" FLOPs and its utilisation of them as HFU.

    python benchmarks/train_throughput.py [--reps 7] [--threads 1] [--quick] [--breakdown]

The last line is `training throughput vs OpenFlamingo: X.XXx`.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import math
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch
from torch import nn

LAION_MULT, MMC4_MULT = 0.2, 1.0
LR, WEIGHT_DECAY, WARMUP = 1e-4, 0.1, 5000


# ----------------------------------------------------------------------------- OpenFlamingo
def import_train_one_epoch():
    """OpenFlamingo's training step function from the installed wheel."""
    C.import_openflamingo()  # stubs open_clip (only its factory needs it)
    # wandb is imported at module level there, unused here; the stub needs a spec because
    # accelerate (imported by transformers) probes packages with importlib.util.find_spec.
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    sys.modules.setdefault("wandb", wandb)
    try:
        from open_flamingo.train.train_utils import train_one_epoch
    except ImportError as err:
        raise SystemExit(f"open_flamingo.train.train_utils is not importable ({err}); this benchmark calls "
                         f"OpenFlamingo's own train_one_epoch (open-flamingo==2.0.1 ships it)") from None
    return train_one_epoch


class DDPLike(nn.Module):
    """What `train_one_epoch` expects of its DDP-wrapped model on one process: `.module` and a
    call that forwards (no gradient all-reduce). Optionally records the labels it is given."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.recorded: list[dict[str, torch.Tensor]] | None = None

    def forward(self, **kwargs):
        if self.recorded is not None:
            self.recorded.append({k: v.detach().clone() for k, v in kwargs.items()})
        return self.module(**kwargs)


def of_optimizer(ddp_model: nn.Module):
    """open_flamingo/train/train.py, non-FSDP path: AdamW over the trainable named parameters,
    weight decay only on those whose name contains 'gated_cross_attn'; constant-with-warmup."""
    from transformers import get_constant_schedule_with_warmup

    params_to_optimize = [(n, p) for n, p in ddp_model.named_parameters()
                          if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    with_wd = [p for n, p in params_to_optimize if "gated_cross_attn" in n]
    without_wd = [p for n, p in params_to_optimize if "gated_cross_attn" not in n]
    optimizer = torch.optim.AdamW([{"params": with_wd, "weight_decay": WEIGHT_DECAY},
                                   {"params": without_wd, "weight_decay": 0.0}], lr=LR)
    return optimizer, get_constant_schedule_with_warmup(optimizer, num_warmup_steps=WARMUP)


class FixedLoader:
    """A loader of `num_batches` copies of one batch (OpenFlamingo reads `.num_batches`)."""

    def __init__(self, batch, num_batches: int = 1) -> None:
        self.batch, self.num_batches = batch, num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.batch


# ------------------------------------------------------------------------------------- ours
class FixedSource:
    """A BatchSource yielding the same Batch forever; its position is the number yielded."""

    def __init__(self, batch) -> None:
        self.batch, self.position = batch, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


# ------------------------------------------------------------------------------------ batches
def make_laion(s: C.Sizes, seq: int, eoc_id: int, media_id: int, pad_id: int, seed: int = 3):
    """OpenFlamingo's LAION text: `<s><image>caption<|endofchunk|></s>`, right-padded to `seq`
    (captions of random length); one image per sample. Returns (input_ids, attention_mask, pixels
    [B, 3, H, W])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((s.batch, seq), pad_id, dtype=torch.long)
    mask = torch.zeros(s.batch, seq, dtype=torch.long)
    for b in range(s.batch):
        words = int(torch.randint(max(2, seq // 3), seq - 4 + 1, (1,), generator=g))
        text = torch.randint(len(C.SPECIAL), s.vocab, (words,), generator=g)
        row = torch.cat([torch.tensor([1, media_id]), text, torch.tensor([eoc_id, 2])])
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    pixels = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    return ids, mask, pixels


def target_tokens(labels: torch.Tensor) -> int:
    """Positions that are next-token targets (the label of position 0 never is)."""
    return int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------- building
def build(s: C.Sizes, laion_seq: int, threads: int, run_dir: str):
    from flamingo.data.batch import Batch
    from flamingo.model.vision import HFVisionEncoder
    from flamingo.training.config import (
        DatasetSpec,
        LoggingConfig,
        OptimConfig,
        ScheduleConfig,
        TrainConfig,
    )
    from flamingo.training.trainer import Trainer

    train_one_epoch = import_train_one_epoch()
    lm = C.make_lm(s)
    clip = C.make_clip_vision(s)
    encoder = HFVisionEncoder.from_model(clip)
    tok_ours, tok_of = C.make_tokenizer(s.vocab), C.make_tokenizer(s.vocab)
    torch.manual_seed(10)
    ours = C.build_ours(C.copy_lm(lm), tok_ours, s, encoder, s.vision_width)
    torch.manual_seed(11)
    of = C.build_openflamingo(lm, tok_of, C.OFVisionStub(encoder=encoder), s.vision_width, s.every)
    ids = (ours.eoc_token_id, ours.media_token_id)
    if ids != (of.eoc_token_id, of.media_token_id) or tok_ours.pad_token_id != tok_of.pad_token_id:
        raise RuntimeError("special token ids differ between ours and OpenFlamingo")
    eoc_id, media_id = ids
    C.open_gates(of)
    C.sync_weights(ours, of)

    # OpenFlamingo's batches, in its loaders' formats.
    mmc4 = C.make_batch(s, eoc_id, media_id)
    l_ids, l_mask, l_px = make_laion(s, laion_seq, eoc_id, media_id, tok_of.pad_token_id)
    batch_laion = (l_px, (l_ids, l_mask))  # images [(b t f), c, h, w]
    batch_mmc4 = (mmc4.pixel_values[:, :, 0],  # images [b, (t f), c, h, w]
                  [(mmc4.input_ids[b:b + 1], mmc4.attention_mask[b:b + 1]) for b in range(s.batch)])
    of_ddp = DDPLike(of)
    of_opt, of_sched = of_optimizer(of_ddp)
    of_args = types.SimpleNamespace(
        num_epochs=1, precision="fp32", fsdp=False, fsdp_use_orig_params=False, rank=1, world_size=1,
        gradient_accumulation_steps=1, loss_multiplier_laion=LAION_MULT, loss_multiplier_mmc4=MMC4_MULT,
        freeze_lm_embeddings=False, report_to_wandb=False, logging_steps=10**9,
        batch_size_laion=s.batch, batch_size_mmc4=s.batch)
    laion_loader, mmc4_loader = FixedLoader(batch_laion), FixedLoader(batch_mmc4)

    def of_step():
        train_one_epoch(of_args, of_ddp, 0, laion_loader, mmc4_loader, tok_of, of_opt, of_sched, "cpu", None)

    # OpenFlamingo's first step (its warm-up: lr 0 at schedule step 0) records the labels it makes.
    of_ddp.recorded = []
    of_step()
    (rec_laion, rec_mmc4), of_ddp.recorded = of_ddp.recorded, None

    def ours_batch(rec, pixel_values) -> Batch:
        labels = rec["labels"].clone()
        labels[:, 0] = -100  # as our pipeline (make_labels); position 0 is never a target anyway
        n = pixel_values.shape[1]
        return Batch(rec["lang_x"], rec["attention_mask"].long(), labels, pixel_values,
                     torch.full((s.batch,), n), torch.zeros(s.batch, dtype=torch.bool))

    batches = {"laion": ours_batch(rec_laion, l_px[:, None, None]),
               "mmc4": ours_batch(rec_mmc4, mmc4.pixel_values)}
    of_inputs = {"laion": rec_laion, "mmc4": rec_mmc4}

    config = TrainConfig(
        model=ours.config,
        datasets=[DatasetSpec("laion", "in_memory", weight=LAION_MULT, batch_size=s.batch),
                  DatasetSpec("mmc4", "in_memory", weight=MMC4_MULT, batch_size=s.batch)],
        run_dir=run_dir, steps=10**9, precision="fp32", device="cpu", threads=threads,
        optim=OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=1.0),
        schedule=ScheduleConfig(kind="constant", warmup_steps=WARMUP),
        logging=LoggingConfig(progress_bar=False))
    trainer = Trainer(config, model=ours, sources={n: FixedSource(b) for n, b in batches.items()})

    history = []

    def ours_step():
        result = trainer.train_step()
        assert result is not None and not result.skipped, result
        history.append(result)
        return result

    return {"ours": ours, "of": of, "trainer": trainer, "steps": {"ours": ours_step, "of": of_step},
            "history": history, "batches": batches, "of_inputs": of_inputs}


def check_equivalence(built) -> list[tuple[str, float, float]]:
    """Per-batch mean loss of ours (called as the trainer calls it) and of OpenFlamingo (called
    as train_one_epoch calls it), on the batches and labels of the benchmark."""
    out = []
    with torch.no_grad():
        for name, batch in built["batches"].items():
            rec = built["of_inputs"][name]
            ours = built["ours"](batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                                 num_media=batch.num_media, attend_next=batch.attend_next,
                                 labels=batch.labels).loss.item()
            of = built["of"](**rec)[0].item()
            out.append((name, ours, of))
    return out


def bare_steps(built):
    """Forward + backward only (same objective weights, no clipping / optimizer), per side."""
    ours, of = built["ours"], built["of"]
    counts = {n: max(1, b.num_tokens) for n, b in built["batches"].items()}
    weights = {"laion": LAION_MULT, "mmc4": MMC4_MULT}

    def ours_fb():  # as Trainer.train_step calls the model (fused output head + NLL)
        ours.zero_grad(set_to_none=True)
        for name, b in built["batches"].items():
            nll = ours(b.input_ids, b.pixel_values, attention_mask=b.attention_mask, num_media=b.num_media,
                       attend_next=b.attend_next, labels=b.labels).nll_sum
            (nll * (weights[name] / counts[name])).backward()
        ours.zero_grad(set_to_none=True)

    def of_fb():
        of.zero_grad(set_to_none=True)
        for name, rec in built["of_inputs"].items():
            (of(**rec)[0] * weights[name]).backward()
        of.zero_grad(set_to_none=True)

    return {"ours_fb": ours_fb, "of_fb": of_fb}


# ------------------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = query
    return 2 * b * h * sq * key[2] * (d + value[3])


def _sdpa_cpu_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_cpu_fwd(query, key, value)


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return int(counter.get_total_flops())


def make_matmul(n: int):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    c = torch.empty(n, n)

    def run():
        torch.mm(a, b, out=c)

    return run, 2 * n ** 3


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=None, help="timed steps per side (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after the first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, both sides (default 1: on a shared 2-core box any other busy "
                             "process makes 2-thread steps 2-6x slower and erratic; 1-thread steps stay stable)")
    parser.add_argument("--matmul", type=int, default=None, help="size n of the n x n fp32 matmul (default 2048, "
                                                                 "quick 512)")
    parser.add_argument("--max-contention", type=float, default=None,
                        help="drop reps during which other processes used more CPU cores than this (default: keep "
                             "all; their average use is reported)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time forward+backward alone per side (step minus it: clipping, optimizer, "
                             "trainer / loop overhead)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counting (and MFU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    s = C.Sizes.quick() if args.quick else C.Sizes()
    laion_seq = 16 if args.quick else 32
    reps = args.reps or (3 if args.quick else 7)
    mm_n = args.matmul or (512 if args.quick else 2048)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flamingo-train-throughput-") as run_dir:
        built = build(s, laion_seq, args.threads, run_dir)
        trainer, ours, of = built["trainer"], built["ours"], built["of"]
        steps = dict(built["steps"])
        if args.breakdown:
            steps.update(bare_steps(built))
        matmul, mm_flops = make_matmul(mm_n)
        batches = built["batches"]
        train_tokens = sum(target_tokens(b.labels) for b in batches.values())
        input_tokens = sum(int(b.attention_mask.sum()) for b in batches.values())

        print(f"config: Llama LM vocab {s.vocab}, hidden {s.hidden}, {s.layers} blocks (ffn {s.intermediate}, "
              f"{s.heads} heads / {s.kv_heads} kv), {'tied' if s.tied else 'untied'} embeddings; "
              f"CLIP {s.image_size}px/patch {s.patch}, width {s.vision_width}, {s.vision_layers} layers (frozen, "
              f"run on pixels by both); resampler depth 6, 64 latents; xattn every {s.every} blocks; fp32")
        print(f"step: LAION {s.batch} x {laion_seq} tokens, 1 image each (loss x {LAION_MULT}) + MMC4 "
              f"{s.batch} x {s.seq} tokens, {s.images} images each (x {MMC4_MULT}); clip 1.0, AdamW lr {LR}, "
              f"wd {WEIGHT_DECAY}, constant schedule with {WARMUP} warm-up steps; threads {args.threads}")
        print(f"tokens per step: {train_tokens} training tokens (next-token targets), {input_tokens} input "
              f"tokens (non-padding); reps {reps} (+{args.warmup + 1} warm-up); built in "
              f"{time.perf_counter() - t0:.1f}s")
        print("ours: flamingo.training.Trainer.train_step(); OpenFlamingo: open_flamingo.train.train_utils."
              "train_one_epoch (installed wheel), one-step epochs")
        print(f"trainable parameters: ours {C.trainable_params(ours):,} (optimizer: "
              f"{sum(p.numel() for p in trainer.params):,}), OpenFlamingo {C.trainable_params(of):,}")

        worst = 0.0
        print("equivalence (OpenFlamingo's weights through our converter):")
        for name, lo, lf in check_equivalence(built):
            diff = abs(lo - lf)
            ok = diff <= 1e-4 * max(1.0, abs(lf))
            worst = max(worst, diff)
            print(f"  {name}: loss ours {lo:.6f}, OF {lf:.6f}, |diff| {diff:.2e} -> {'OK' if ok else 'MISMATCH'}")
            if not ok:
                print("  WARNING: the two models do not compute the same loss; timings compare different work")

        # Warm-up (OpenFlamingo already ran one step inside build), then timed reps.
        steps["ours"]()
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        matmul()

        names = [*steps, "matmul"]
        runs: list[dict[str, float]] = []
        contention: list[float] = []
        dropped = 0
        budget = 3 * reps
        attempt = 0
        while len(runs) < reps and attempt < budget:
            order = list(steps) if attempt % 2 == 0 else list(reversed(steps))
            attempt += 1
            rep: dict[str, float] = {}
            with C.ContentionMeter() as whole:
                for name in order:
                    t = time.perf_counter()
                    steps[name]()
                    rep[name] = time.perf_counter() - t
                t = time.perf_counter()
                matmul()
                rep["matmul"] = time.perf_counter() - t
            if args.max_contention is not None and whole.others_fraction > args.max_contention:
                dropped += 1
                continue
            runs.append(rep)
            contention.append(whole.others_fraction)
        if len(runs) < reps:
            print(f"WARNING: only {len(runs)} reps were quiet enough (--max-contention {args.max_contention})")
        if not runs:
            raise SystemExit("no rep was quiet enough to measure")

        flops = {}
        if not args.no_flops:
            flops["ours"] = count_flops(steps["ours"])
            flops["of"] = count_flops(steps["of"])


    med = {n: statistics.median(r[n] for r in runs) for n in names}
    ratios = [r["of"] / r["ours"] for r in runs]
    speedup = statistics.median(ratios)
    labels = {"ours": "ours (Trainer.train_step)", "of": "OpenFlamingo (train_one_epoch)",
              "ours_fb": "  ours fwd+bwd only", "of_fb": "  OF fwd+bwd only", "matmul": f"matmul {mm_n}^3 fp32"}
    print()
    print(f"{'':<32}{'median s':>10}{'min':>8}{'max':>8}{'train tok/s':>13}")
    for n in names:
        times = [r[n] for r in runs]
        tps = f"{train_tokens / med[n]:>13.1f}" if n != "matmul" else f"{mm_flops / med[n] / 1e9:>9.1f} GF/s"
        print(f"{labels[n]:<32}{med[n]:>10.3f}{min(times):>8.3f}{max(times):>8.3f}{tps}")
    print(f"{len(runs)} reps ({dropped} dropped), order alternated; other processes used on average "
          f"{statistics.mean(contention):.2f} CPU cores meanwhile (max {max(contention):.2f}) of {os.cpu_count()}")
    print(f"per-rep ratios OF/ours: {', '.join(f'{x:.2f}' for x in ratios)}; median {speedup:.2f}x; "
          f"ratio of medians {med['of'] / med['ours']:.2f}x")
    if args.breakdown:
        for side, fb in (("ours", "ours_fb"), ("of", "of_fb")):
            extra = statistics.median(r[side] - r[fb] for r in runs)
            print(f"{side}: step - fwd/bwd = {extra * 1e3:.0f} ms (median per rep; clip + optimizer + "
                  f"schedule + loop / label making), {extra / med[side] * 100:.0f}% of the step")
    hist = built["history"]
    print(f"our training loss (weighted sum): {hist[0].loss:.4f} at step {hist[0].step}, {hist[-1].loss:.4f} at "
          f"step {hist[-1].step} (lr {hist[-1].lr:.2e}, still in warm-up); our StepResult counts "
          f"{hist[-1].target_tokens} target tokens per step")

    if flops:
        model_flops = flops["ours"]
        peak = [mm_flops / r["matmul"] for r in runs]
        mfu = {side: statistics.median(model_flops / r[side] / p for r, p in zip(runs, peak)) for side in ("ours", "of")}
        hfu = {side: statistics.median(flops[side] / r[side] / p for r, p in zip(runs, peak)) for side in ("ours", "of")}
        print()
        print(f"FLOPs per step (FlopCounterMode): ours {flops['ours'] / 1e9:.1f} G, OpenFlamingo "
              f"{flops['of'] / 1e9:.1f} G executed (+{(flops['of'] / flops['ours'] - 1) * 100:.0f}%: the weight "
              f"gradient of its whole tied embedding table); model FLOPs = {model_flops / 1e9:.1f} G")
        print(f"matmul reference: {statistics.median(peak) / 1e9:.1f} GFLOP/s median ({mm_n}x{mm_n} fp32, "
              f"{args.threads} threads, timed in every rep)")
        print(f"achieved: ours {model_flops / med['ours'] / 1e9:.1f} GFLOP/s, OpenFlamingo "
              f"{model_flops / med['of'] / 1e9:.1f} model GFLOP/s ({flops['of'] / med['of'] / 1e9:.1f} executed)")
        print(f"MFU (model FLOPs/s / matmul FLOP/s, per rep, median): ours {mfu['ours'] * 100:.1f}%, "
              f"OpenFlamingo {mfu['of'] * 100:.1f}%; HFU (own executed FLOPs): ours {hfu['ours'] * 100:.1f}%, "
              f"OpenFlamingo {hfu['of'] * 100:.1f}%")
    if not math.isfinite(speedup):
        raise SystemExit("no valid timing")
    print(f"total wall time {time.perf_counter() - t0:.0f}s")
    print()
    print(f"training throughput vs OpenFlamingo: {speedup:.2f}x")


if __name__ == "__main__":
    main()
