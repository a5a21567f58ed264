"""Training-step benchmark: ours vs OpenFlamingo on an identical small configuration.

Both models wrap the same random Llama-architecture LM (SmolLM-like: vocabulary of 49,152 tokens,
tied input/output embeddings as SmolLM2 and OpenFlamingo's MPT LMs (`--untied` to untie), hidden
512, 8 blocks; built locally, nothing downloaded), the same frozen random CLIP vision tower
(224 px, patch 32, width 256, one shared instance), OpenFlamingo's bridge sizes (resampler depth
6, 64 latents, 8x64 heads, GELU; gated xattn 8x64 heads before every 2nd block, counting from 1)
and the same batch (4 samples x 256 tokens, 3 images each, labels = input ids).

Trainable parts are what each project trains: OpenFlamingo (its factory's freezing, default
freeze_lm_embeddings=False) trains the resampler, the xattn layers and the LM's whole input
embedding table; ours trains the resampler, the xattn layers and the rows of the two added tokens.

A step is: zero grads (set to None), forward with labels, loss.backward() (no optimizer step).
Ours computes that loss as `forward(labels=...)` always does, through the fused output head + NLL
(`flamingo.model.fused_head_loss`: the head's products run inside the loss, at labelled tokens
only), so in the time split ours' head time is under "other", not "lm head".
Timing alternates ours / OpenFlamingo in one process after a warm-up and reports medians. The
machine may be shared: a pair of steps during which other processes used more than
--max-contention CPU cores (machine busy time from /proc/stat minus this process's) is discarded
and rerun. Before timing, OpenFlamingo's trainable weights (gates opened) are converted into ours
and the two losses must agree. Peak memory is measured per model in a fresh spawned subprocess
(see `_memory_worker`); a profiled step per model gives the forward/backward time split.

    python benchmarks/train_step.py [--reps 7] [--batch 4] [--seq 256] [--threads 2] [--untied] [--quick]

The last line is `train_step speedup vs OpenFlamingo: X.XXx, peak memory ratio: Y.YY`
(speedup = OpenFlamingo median / our median; memory ratio = our step peak / OpenFlamingo's).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import torch


# --------------------------------------------------------------------------------- building
def build(s: C.Sizes, which: tuple[str, ...] = ("ours", "of")):
    """Build the requested models over identical backbones; returns a dict with the models,
    step closures, the batch and notes. Deterministic: a subprocess rebuilds the same thing."""
    lm = C.make_lm(s)
    clip = C.make_clip_vision(s)
    vis_dim = s.vision_width
    notes: list[str] = []

    # Our vision encoder (src/flamingo/model/vision.py) over the shared CLIP tower; if it is
    # missing or broken, both models get precomputed features instead.
    encoder = None
    try:
        from flamingo.model.vision import HFVisionEncoder

        encoder = HFVisionEncoder.from_model(clip)
        probe = torch.zeros(1, 1, 1, 3, s.image_size, s.image_size)
        got = encoder(probe)
        expected = (1, 1, 1, (s.image_size // s.patch) ** 2, vis_dim)
        if tuple(got.shape) != expected:
            raise ValueError(f"encoder output {tuple(got.shape)}, expected {expected}")
        vision_mode = "pixels"
        notes.append("vision: pixels through our HFVisionEncoder (shared instance; OF's stub calls it too)")
    except Exception as err:  # noqa: BLE001
        vision_mode = "features"
        notes.append(f"vision: our encoder unavailable ({type(err).__name__}: {err}); "
                     "both models get precomputed CLIP patch features (no vision cost)")

    tok_ours, tok_of = C.make_tokenizer(s.vocab), C.make_tokenizer(s.vocab)
    out: dict = {"notes": notes, "vision_mode": vision_mode}
    features = None
    models = {}
    if "ours" in which:
        lm_ours = C.copy_lm(lm) if "of" in which else lm
        torch.manual_seed(10)
        ours = C.build_ours(lm_ours, tok_ours, s, encoder if vision_mode == "pixels" else None, vis_dim)
        ours.train()
        models["ours"] = ours
        eoc_id, media_id = ours.eoc_token_id, ours.media_token_id
    if "of" in which:
        torch.manual_seed(11)
        stub = C.OFVisionStub(encoder=encoder if vision_mode == "pixels" else None)
        of = C.build_openflamingo(lm, tok_of, stub, vis_dim, s.every)
        of.train()
        models["of"] = of
        of_ids = (of.eoc_token_id, of.media_token_id)
        if "ours" in models and of_ids != (eoc_id, media_id):
            raise RuntimeError(f"special token ids differ: ours {(eoc_id, media_id)}, OF {of_ids}")
        eoc_id, media_id = of_ids
    batch = C.make_batch(s, eoc_id, media_id)
    if vision_mode == "features":
        with torch.no_grad():
            px = batch.pixel_values.flatten(0, 2)
            hidden = clip(pixel_values=px).last_hidden_state
            tower = getattr(clip, "vision_model", clip)
            features = tower.post_layernorm(hidden[:, 1:])  # [B*N, S, D]
        if "of" in models:
            models["of"].vision_encoder.features = features

    steps = {}
    if "ours" in models:
        ours = models["ours"]
        media_kw = ({"pixel_values": batch.pixel_values} if vision_mode == "pixels" else
                    {"vision_features": features.reshape(s.batch, s.images, 1, *features.shape[1:])})

        def ours_forward():
            return ours(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                        **media_kw).loss

        def ours_step():
            ours.zero_grad(set_to_none=True)
            loss = ours_forward()
            loss.backward()
            return loss.detach()

        steps["ours"] = ours_step
        out["ours_forward"] = ours_forward
    if "of" in models:
        of = models["of"]
        # In features mode the stub ignores its input: a 1x1 dummy keeps OF's shape checks happy.
        vision_x = (batch.pixel_values if vision_mode == "pixels"
                    else torch.zeros(s.batch, s.images, 1, 3, 1, 1))

        def of_forward():
            return of(vision_x=vision_x, lang_x=batch.input_ids, attention_mask=batch.attention_mask,
                      labels=batch.labels)[0]

        def of_step():
            of.zero_grad(set_to_none=True)
            loss = of_forward()
            loss.backward()
            return loss.detach()

        steps["of"] = of_step
        out["of_forward"] = of_forward
    out.update(models=models, steps=steps, batch=batch, encoder=encoder)
    return out


def scopes_for(name: str, model, encoder) -> dict[str, list]:
    """Components of each model for the time split."""
    if name == "ours":
        from flamingo.model.language_model import (
            FlamingoDecoderLayer,
            find_decoder_layers,
        )

        _, stack = find_decoder_layers(model.lm, model.decoder_layers_path)
        layers = [b.decoder_layer if isinstance(b, FlamingoDecoderLayer) else b for b in stack]
        return {"vision": [encoder] if encoder is not None else [],
                "perceiver": [model.perceiver],
                "xattn": list(model.cross_attn_layers.values()),
                "lm blocks": layers,
                "embed": [model.input_embeddings],
                "lm head": [model.output_head]}
    lang = model.lang_encoder
    return {"vision": [model.vision_encoder],
            "perceiver": [model.perceiver],
            "xattn": [l for l in lang.gated_cross_attn_layers if l is not None],
            "lm blocks": list(lang.old_decoder_blocks),
            "embed": [lang.get_input_embeddings()],
            "lm head": [lang.get_output_embeddings()]}


# ----------------------------------------------------------------------------------- memory
def _memory_worker(which: str, sizes: C.Sizes, threads: int, steps: int, queue) -> None:
    """Peak memory of one model's training step, in a fresh process (spawned, so nothing of the
    other model or of the timing run is in it).

    Method: the child runs with a fixed glibc mmap threshold (set by the parent), so every tensor
    above 64 KiB is its own mmap and is returned to the OS when freed: resident memory then tracks
    live tensors (torch's CPU allocator does not cache). After building and one warm-up step (which
    also pages in the kernels' code), grads are dropped, the process RSS is the baseline, the
    kernel's peak-RSS counter (VmHWM) is reset to it, `steps` steps run, and the result is
    VmHWM - baseline: the extra memory a training step needs on top of the built model
    (activations, logits, gradients of the trainable parameters, temporaries)."""
    torch.set_num_threads(threads)
    built = build(sizes, which=(which,))
    step = built["steps"][which]
    model = built["models"][which]
    step()
    model.zero_grad(set_to_none=True)
    C.release_memory()
    model_rss = C.current_rss_mib()
    exact = C.reset_peak_rss()
    if not exact:  # fall back to the lifetime peak (may under-report the step's own peak)
        model_rss = max(model_rss, C.peak_rss_mib())
    for _ in range(steps):
        step()
    peak = C.peak_rss_mib()
    queue.put({"which": which, "model_rss": model_rss, "peak": peak, "delta": peak - model_rss,
               "exact": exact})


def measure_memory(which: str, sizes: C.Sizes, threads: int, steps: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    try:
        proc = ctx.Process(target=_memory_worker, args=(which, sizes, threads, steps, queue))
        proc.start()
        result = queue.get()
        proc.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=None, help="timed steps per model (default 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--batch", type=int, default=None, help="samples per batch (default 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 256)")
    parser.add_argument("--images", type=int, default=None, help="images per sample (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--untied", action="store_true",
                        help="untie the LM's input/output embeddings (default: tied, as SmolLM2, our default "
                             "LM, and OpenFlamingo's MPT LMs; with tied embeddings OpenFlamingo's trainable "
                             "input table is also its output head)")
    parser.add_argument("--max-contention", type=float, default=0.15,
                        help="discard step pairs during which other processes used more CPU cores than this")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-component time split")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    s = C.Sizes.quick() if args.quick else C.Sizes()
    s.batch = args.batch or s.batch
    s.seq = args.seq or s.seq
    s.images = args.images or s.images
    s.tied = not args.untied
    reps = args.reps or (3 if args.quick else 7)

    t0 = time.perf_counter()
    built = build(s)
    ours, of = built["models"]["ours"], built["models"]["of"]
    steps = built["steps"]
    print(f"config: Llama LM vocab {s.vocab}, hidden {s.hidden}, {s.layers} blocks (ffn {s.intermediate}, "
          f"{s.heads} heads / {s.kv_heads} kv), {'tied' if s.tied else 'untied'} embeddings; "
          f"CLIP {s.image_size}px/patch {s.patch}, width {s.vision_width}, {s.vision_layers} layers; "
          f"resampler depth 6, 64 latents, 8x64 heads; xattn 8x64 heads every {s.every} blocks")
    print(f"batch: {s.batch} x {s.seq} tokens, {s.images} images each; threads {args.threads}; "
          f"reps {reps} (+{args.warmup} warm-up); built in {time.perf_counter() - t0:.1f}s")
    for note in built["notes"]:
        print(note)
    print(f"trainable parameters: ours {C.trainable_params(ours):,}, OpenFlamingo {C.trainable_params(of):,}")

    # Same computation: OF's trainable weights (gates opened) copied into ours, losses compared.
    C.open_gates(of)
    C.sync_weights(ours, of)
    with torch.no_grad():
        loss_ours = built["ours_forward"]().item()
        loss_of = built["of_forward"]().item()
    diff = abs(loss_ours - loss_of)
    ok = diff <= 1e-4 * max(1.0, abs(loss_of))
    print(f"equivalence (OpenFlamingo's weights through our converter): loss ours {loss_ours:.6f}, OF {loss_of:.6f}, |diff| {diff:.2e} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    if not ok:
        print("WARNING: the two models do not compute the same loss; timings compare different work")

    # Timing: warm up both, then alternate (order swapped every rep) in this one process. This
    # machine may be shared: a pair of steps during which other processes used more than
    # --max-contention cores is discarded and run again (at most 4 x reps pairs in all).
    for _ in range(args.warmup):
        steps["ours"]()
        steps["of"]()
    pairs: list[tuple[dict[str, float], bool]] = []
    while sum(not busy for _, busy in pairs) < reps and len(pairs) < 4 * reps:
        order = ("ours", "of") if len(pairs) % 2 == 0 else ("of", "ours")
        pair, busy = {}, False
        for name in order:
            with C.ContentionMeter() as meter:
                steps[name]()
            pair[name] = meter.wall
            busy = busy or meter.others_fraction > args.max_contention
        pairs.append((pair, busy))
    clean = [p for p, busy in pairs if not busy]
    used = clean if len(clean) >= min(3, reps) else [p for p, _ in pairs]
    times = {name: [p[name] for p in used] for name in ("ours", "of")}
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(p["of"] / p["ours"] for p in used)
    contention_note = (f"{len(pairs) - len(clean)} of {len(pairs)} step pairs discarded: other processes used "
                       f"> {args.max_contention} cores meanwhile")
    if used is not clean:
        contention_note += f"; too few clean pairs, so ALL {len(pairs)} are used: timings are unreliable"

    split = {}
    if not args.no_profile:
        for name, model in (("ours", ours), ("of", of)):
            for _ in range(3):  # retry a profile taken while other processes were busy
                with C.ContentionMeter() as meter:
                    split[name] = C.profile_split(steps[name], scopes_for(name, model, built["encoder"]))
                if meter.others_fraction <= args.max_contention:
                    break

    mem = {}
    if not args.no_memory:
        del built, ours, of, steps
        C.release_memory()
        for name in ("ours", "of"):
            mem[name] = measure_memory(name, s, args.threads)

    labels = {"ours": "ours", "of": "OpenFlamingo"}
    print()
    print(f"{'model':<13}{'median s/step':>14}{'min':>8}{'max':>8}{'model RSS MiB':>15}{'step peak MiB':>15}")
    for name in ("ours", "of"):
        m = mem.get(name)
        print(f"{labels[name]:<13}{med[name]:>14.3f}{min(times[name]):>8.3f}{max(times[name]):>8.3f}"
              f"{(m['model_rss'] if m else float('nan')):>15.1f}{(m['delta'] if m else float('nan')):>15.1f}")
    print(f"{contention_note}; median of per-pair ratios OF/ours: {paired:.2f}x")
    if mem:
        exact = all(m["exact"] for m in mem.values())
        print("step peak = peak RSS during the steps minus the RSS of the built, warmed-up model, each model "
              "in its own fresh subprocess" + ("" if exact else " (VmHWM reset unavailable: lifetime peak used)"))

    if split:
        print()
        print("time split of one profiled step (ms; forward / backward; profiler overhead included)")
        comps = list(split["ours"])
        print(f"{'component':<12}{'ours fwd':>10}{'ours bwd':>10}{'OF fwd':>10}{'OF bwd':>10}")
        for c in comps:
            (fo, bo), (ff, bf) = split["ours"][c], split["of"][c]
            print(f"{c:<12}{fo:>10.1f}{bo:>10.1f}{ff:>10.1f}{bf:>10.1f}")

    speedup = med["of"] / med["ours"]
    ratio = mem["ours"]["delta"] / mem["of"]["delta"] if mem else float("nan")
    print()
    print(f"train_step speedup vs OpenFlamingo: {speedup:.2f}x, peak memory ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
