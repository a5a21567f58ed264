"""Weight-only quantization (torchao) of the embedded default model: decode speed, memory, accuracy.

Each mode (fp32, int8, int4) runs in its own process, so its memory figures are its own:
`load_model("embedded", quantize=MODE)` (flamingo.model.quantize: the frozen LM's linear layers
quantized; the cross-attention, resampler and output head stay fp32), then

- decode: one 4-shot binding prompt (5 images), greedy, `--new-tokens` tokens (no stop at
  <|endofchunk|>), batch 1; decode tokens/s = (new tokens - 1) / (median time of the whole
  generation - median time of a 1-token generation), so the prompt's prefill is left out;
- memory: the bytes of the model's weights as stored (quantized tensors: their integer data, scales
  and zero points; tied tables once), the process's RSS after loading, and its peak RSS during the
  decoding and the evaluation (VmHWM, reset after loading);
- accuracy: the `flamingo eval-offline` tasks binding, induction, shape and colour at 0 and 4 shots,
  `--episodes` episodes for each of `--seeds` seeds (the same episodes in every mode); each cell with
  its 95% Wilson interval over the pooled episodes, and the mean drop vs fp32 over the cells with a
  95% normal interval (unpaired: conservative, the episodes being identical).

    flock /tmp/flamingo-cpu.lock nice python benchmarks/quantized.py [--modes fp32,int8,int4]
        [--episodes 64] [--seeds 2] [--new-tokens 32] [--reps 5] [--threads 2]

The last line is `int8 decode speedup vs fp32: X.XXx (mean accuracy drop Y.Y points)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("binding", "induction", "shape", "colour")
SHOTS = (0, 4)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored: a torchao tensor counts its inner
    tensors (integer data, scales, zero points), a tensor shared by several modules counts once."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        if type(tensor) is not torch.Tensor:  # a tensor subclass: its inner tensors hold the data
            names = list(getattr(tensor, "tensor_data_names", [])) + list(getattr(tensor, "optional_tensor_data_names", []))
            for name in names:
                inner = getattr(tensor, name, None)
                if isinstance(inner, torch.Tensor):
                    add(inner)
            return
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor.data)
    return total


def worker(mode: str, args: argparse.Namespace) -> dict:
    import torch

    import _common as C
    from flamingo.data.episodes import episode_items, make_episode
    from flamingo.evaluation.procedural import episode_accuracy
    from flamingo.inference.generation import GenerationConfig, generate
    from flamingo.inference.prompt import interleaved_prompt
    from flamingo.inference.state import encode_prompts
    from flamingo.model.weights import load_model

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model("embedded", quantize=None if mode == "fp32" else mode)
    model.fuse_for_inference()
    load_s = time.perf_counter() - start
    C.release_memory()
    rss_after_load = C.current_rss_mib()
    C.reset_peak_rss()

    support, query, _, _ = make_episode("binding", 4, 0, 0)
    prompt = interleaved_prompt(episode_items(support, query, model.config.end_of_chunk_token),
                                model.config.media_token)

    def run(new_tokens: int) -> float:
        state = encode_prompts(model, [prompt], max_new_tokens=new_tokens)
        config = GenerationConfig(max_new_tokens=new_tokens, stop_at_end_of_chunk=False)
        begin = time.perf_counter()
        result = generate(model, state, config)[0]
        elapsed = time.perf_counter() - begin
        assert len(result.token_ids) == new_tokens, (len(result.token_ids), new_tokens)
        return elapsed

    with torch.no_grad():
        run(2)  # warm-up
        full, one = [], []
        for _ in range(args.reps):
            full.append(run(args.new_tokens))
            one.append(run(1))
    decode_s = statistics.median(full) - statistics.median(one)
    accuracies = {}
    for task in TASKS:
        for shots in SHOTS:
            accuracies[f"{task} {shots}"] = [episode_accuracy(model, task, shots, seed, args.episodes)
                                             for seed in range(args.seeds)]
            print(f"  [{mode}] {task} {shots}-shot: {accuracies[f'{task} {shots}']}", file=sys.stderr, flush=True)
    return {"mode": mode, "load_s": load_s, "weights_mib": weight_bytes(model) / 2**20,
            "rss_after_load_mib": rss_after_load, "peak_rss_mib": C.peak_rss_mib(),
            "decode_tokens_per_s": (args.new_tokens - 1) / decode_s, "full_s": full, "one_s": one,
            "accuracies": accuracies}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,int8,int4", help="comma-separated, fp32 first")
    parser.add_argument("--episodes", type=int, default=64, help="episodes per seed, task and shot count")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="timed generations of each length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    modes = args.modes.split(",")
    assert modes[0] == "fp32" and "int8" in modes, "--modes: fp32 first, and int8 (the last line compares them)"
    print(f"embedded default, torch {__import__('torch').__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    results = {}
    for mode in modes:
        argv = [sys.executable, __file__, "--worker", mode, "--episodes", str(args.episodes), "--seeds", str(args.seeds),
                "--new-tokens", str(args.new_tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    n = args.episodes * args.seeds
    print(f"\n| mode | weights MiB | RSS after load MiB | peak RSS MiB | decode tokens/s (batch 1) | load s |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['weights_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['decode_tokens_per_s']:.2f} | {r['load_s']:.0f} |")
    cells = list(results["fp32"]["accuracies"])
    print(f"\naccuracy %, {args.episodes} episodes x {args.seeds} seeds per cell, [95% Wilson interval]")
    print("| task | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for cell in cells:
        row = []
        for mode in modes:
            p = statistics.fmean(results[mode]["accuracies"][cell])
            low, high = wilson(p, n)
            row.append(f"{100 * p:.1f} [{100 * low:.0f}, {100 * high:.0f}]")
        print(f"| {cell}-shot | " + " | ".join(row) + " |")
    drops = {}
    for mode in modes[1:]:
        diffs, variance = [], 0.0
        for cell in cells:
            p0 = statistics.fmean(results["fp32"]["accuracies"][cell])
            p1 = statistics.fmean(results[mode]["accuracies"][cell])
            diffs.append(p0 - p1)
            variance += (p0 * (1 - p0) + p1 * (1 - p1)) / n
        drop = 100 * statistics.fmean(diffs)
        half = 100 * 1.96 * math.sqrt(variance) / len(cells)
        speedup = results[mode]["decode_tokens_per_s"] / results["fp32"]["decode_tokens_per_s"]
        drops[mode] = (drop, speedup)
        print(f"{mode}: mean accuracy drop vs fp32 {drop:.1f} points (95% interval {drop - half:.1f} .. "
              f"{drop + half:.1f}); decode {speedup:.2f}x; weights {results[mode]['weights_mib']:.0f} MiB vs "
              f"{results['fp32']['weights_mib']:.0f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    drop, speedup = drops["int8"]
    print(f"int8 decode speedup vs fp32: {speedup:.2f}x (mean accuracy drop {drop:.1f} points)")


if __name__ == "__main__":
    main()
