"""Shared machinery of the inference benchmarks (`fewshot_generate.py`, `decode.py`,
`rank_classes.py`): ours runs in the benchmark's own process, OpenFlamingo 2.0.1 in a worker
process (`_of_worker.py`) started from a virtual environment of its own, because OpenFlamingo's
`generate` needs transformers 4.46.3 while this project uses transformers 5.

How a benchmark runs:

1. The backbones are built here, once (`_common`: a random Llama-architecture LM with a
   SmolLM-sized vocabulary, a WordLevel tokenizer, a random CLIP vision tower) and written to a
   temporary directory: the LM with `save_pretrained`, the tokenizer's `tokenizer.json` plus its
   special tokens, the CLIP tower's config and weights (safetensors).
2. The worker loads them with transformers 4.46.3, builds OpenFlamingo's `Flamingo` the way its
   factory does (`_common.build_openflamingo`; `open_clip` stubbed: the vision encoder is a stub
   whose `.visual(x)` returns (pooled, post_layernorm(last_hidden_state[:, 1:])) of the same CLIP
   tower, which is exactly what our `HFVisionEncoder` feeds our resampler), randomises its
   trainable weights (opened tanh gates, so images matter) and saves them.
3. Ours is built over the very same backbone objects and loads those weights through the repo's
   converter (`convert_openflamingo_state_dict` + `load_trainable_weights`).
4. The task (texts, images) is written for the worker: OpenFlamingo gets the pixel tensors our
   image processor makes from the same PIL images (its side skips the PIL -> tensor step, which
   ours pays inside its timing), then both sides run it once (warm-up, and the equivalence
   check), then strictly alternately (ours, OF, ours, OF, ...), and medians are taken.
   Each side times itself in its own process; the other process is idle meanwhile (blocked on a
   pipe). An (ours, OF) repetition during which other processes used more than
   `--max-contention` CPU cores is discarded and run again (at most 2 x reps in all).
5. Peak memory: see `measure_peak`; each process measures itself, the same way.

The worker protocol is one JSON object per line on the worker's stdin/stdout.
This module imports neither `flamingo` nor PIL at the top, so the worker (OpenFlamingo's venv)
can import it too.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OF_VENV = HERE / ".of-venv"  # ignored by git (see README: Benchmarks)
OF_VERSION = "2.0.1"
OF_TRANSFORMERS = "4.46.3"
SUPPORT_LABEL_WORDS = (1, 3)  # words per caption / class name: uniform in [lo, hi]


# ------------------------------------------------------------------------------------ task
@dataclass
class Task:
    """One benchmark task, identical for both sides. Images are indices into the pixel table.

    kind "generate": every query continues `support_text + query.text` with beam search;
    kind "rank": every query ranks `class_names` by (length-normalised) log-likelihood."""

    kind: str
    support_text: str
    support_images: list[int]
    query_texts: list[str]
    query_images: list[int]
    num_beams: int = 3
    max_new_tokens: int = 10
    length_penalty: float = 0.0  # OpenFlamingo eval's captioning/VQA default
    class_names: list[str] = field(default_factory=list)
    normalize_length: bool = True  # OpenFlamingo eval's classification setting
    of_batch_size: int = 8  # OpenFlamingo eval's --batch_size default

    @property
    def shots(self) -> int:
        return len(self.support_images)


def vocabulary_words(tokenizer: Any) -> list[str]:
    """The tokenizer's ordinary words (no special tokens): one word = one token."""
    special = set(tokenizer.all_special_tokens)
    return [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            if w not in special and not w.startswith("<")]


def make_task(kind: str, tokenizer: Any, *, shots: int, queries: int, classes: int = 0,
              num_beams: int = 3, max_new_tokens: int = 10, seed: int = 0) -> Task:
    """OpenFlamingo-eval-style prompts over random vocabulary words: each support example is
    `<image>output <label><|endofchunk|>` (its ImageNet / caption prompt with `output` for
    `Output:`), each query `<image>output`, so every query prompt has the same length (no padding on
    either side). Labels (captions, class names) have 1-3 words, i.e. 1-3 tokens."""
    rng = random.Random(seed)
    words = vocabulary_words(tokenizer)
    prefix = rng.choice(words)

    def label() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*SUPPORT_LABEL_WORDS)))

    class_names: list[str] = []
    while len(class_names) < classes:  # distinct names
        name = label()
        if name not in class_names:
            class_names.append(name)
    support_labels = [rng.choice(class_names) if class_names else label() for _ in range(shots)]
    support_text = "".join(f"<image>{prefix} {lab}<|endofchunk|>" for lab in support_labels)
    return Task(kind=kind, support_text=support_text, support_images=list(range(shots)),
                query_texts=[f"<image>{prefix}"] * queries, query_images=list(range(shots, shots + queries)),
                num_beams=num_beams, max_new_tokens=max_new_tokens, class_names=class_names)


def make_images(count: int, size: int, seed: int = 0):
    """`count` distinct synthetic RGB images of size x size (smooth colour gradients + noise);
    at the encoder's resolution, so preprocessing is a plain conversion + normalisation."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3), rng.uniform(0, 6.3, 3), rng.uniform(1, 6, 3)
        chans = [0.5 + 0.5 * a[i] * np.sin(c[i] * (xx + yy * (i + 1)) + b[i]) for i in range(3)]
        pixels = np.stack(chans, -1) + rng.normal(0, 0.05, (size, size, 3))
        images.append(Image.fromarray((pixels.clip(0, 1) * 255).astype("uint8"), "RGB"))
    return images


# ------------------------------------------------------------------------------ memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_peak(fn: Callable[[], Any]) -> dict:
    """Run `fn` once and return its peak resident memory above the baseline (MiB).

    Method (the same in both processes): glibc is told to serve every allocation above 64 KiB
    with its own mmap and to return freed memory at once (mallopt M_MMAP_THRESHOLD /
    M_TRIM_THRESHOLD), so resident memory tracks live tensors (torch's CPU allocator does not
    cache); garbage is collected and malloc_trim(0) returns free heap pages; the resident set
    is then the baseline (built model, warmed up), the kernel's peak counter VmHWM is reset to
    it (writing 5 to /proc/self/clear_refs, Linux >= 4.0), `fn` runs, and the result is
    VmHWM - baseline: everything the task needed on top of the model (activations, KV caches,
    logits, temporaries). This runs after the timing, so the timings use glibc's defaults."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 65536)
    except OSError:
        libc = None
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_kib("VmRSS") / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:  # no reset: the lifetime peak (may hide the task's own peak)
        exact = False
    fn()
    peak = _status_kib("VmHWM") / 1024
    return {"base_mib": base, "peak_mib": peak, "delta_mib": peak - base, "exact": exact}


# ----------------------------------------------------------------------------- timing
def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    tck = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy / tck, (int(own[11]) + int(own[12])) / tck


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU cores other processes used meanwhile)."""
    busy0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_seconds()
    others = max(0.0, (busy1 - busy0) - (own1 - own0))
    return result, wall, others / max(wall, 1e-9)


# ---------------------------------------------------------------------- OpenFlamingo venv
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_of_venv(venv: Path) -> None:
    """Create OpenFlamingo's virtual environment if it is missing or incomplete: the same torch
    build as this interpreter's (pinned to its exact version, so a CPU build stays a CPU build),
    transformers 4.46.3, and open-flamingo 2.0.1 without its dependencies (open_clip and the
    training stack are not needed: open_clip is stubbed) plus the two it imports, einops and
    einops-exts."""
    import torch

    probe = ("import sys, types; sys.modules['open_clip'] = types.ModuleType('open_clip'); "
             "import transformers, torch, open_flamingo, einops, einops_exts; "
             f"sys.exit(transformers.__version__ != {OF_TRANSFORMERS!r} or torch.__version__ != {torch.__version__!r})")
    python = venv_python(venv)
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return
    print(f"creating OpenFlamingo's venv in {venv} (torch {torch.__version__}, transformers {OF_TRANSFORMERS}, "
          f"open-flamingo {OF_VERSION}) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={torch.__version__}", f"transformers=={OF_TRANSFORMERS}"], check=True)
    subprocess.run(pip + ["--no-deps", f"open-flamingo=={OF_VERSION}", "einops", "einops-exts"], check=True)
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        raise RuntimeError(f"{venv}: OpenFlamingo's environment is still incomplete after installing")


# -------------------------------------------------------------------------------- worker
class OFWorker:
    """The OpenFlamingo side: a `_of_worker.py` process in OpenFlamingo's venv."""

    def __init__(self, venv: Path, workdir: Path, threads: int) -> None:
        self.log_path = workdir / "of_worker.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(venv_python(venv)), str(HERE / "_of_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=str(HERE))

    def call(self, cmd: str, **kwargs: Any) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            tail = self.log_path.read_text()[-4000:]
            raise RuntimeError(f"OpenFlamingo worker died during {cmd!r}; its log ends with:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"OpenFlamingo worker failed during {cmd!r}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# ------------------------------------------------------------------------------ harness
def add_common_args(parser: argparse.ArgumentParser, reps: int) -> None:
    parser.add_argument("--reps", type=int, default=None, help=f"timed runs per side (default {reps}, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, in both processes")
    parser.add_argument("--max-contention", type=float, default=0.15,
                        help="rerun a repetition during which other processes used more CPU cores than this")
    parser.add_argument("--of-venv", type=Path, default=Path(os.environ.get("FLAMINGO_OF_VENV", DEFAULT_OF_VENV)),
                        help="OpenFlamingo's virtual environment (created if missing; env FLAMINGO_OF_VENV)")
    parser.add_argument("--quick", action="store_true", help="tiny model and task: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--keep", action="store_true", help="keep the exchange directory (printed)")


class Harness:
    """Builds both models over identical backbones and weights and drives the comparison."""

    def __init__(self, args: argparse.Namespace, default_reps: int) -> None:
        import _common as C  # noqa: N812 - the benchmarks' shared builders
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"

        self.args = args
        self.reps = args.reps or (3 if args.quick else default_reps)
        torch.set_num_threads(args.threads)
        self.sizes = C.Sizes.quick() if args.quick else C.Sizes()
        ensure_of_venv(args.of_venv)
        self.workdir = Path(tempfile.mkdtemp(prefix="flamingo-inference-bench-"))
        self.notes: list[str] = []
        t0 = time.perf_counter()

        s = self.sizes
        lm = C.make_lm(s)
        clip = C.make_clip_vision(s)
        tokenizer = C.make_tokenizer(s.vocab)
        self._save_backbones(lm, tokenizer, clip)

        self.worker = OFWorker(args.of_venv, self.workdir, args.threads)
        setup = self.worker.call("setup", workdir=str(self.workdir), threads=args.threads, every=s.every,
                                 vis_dim=s.vision_width)
        self.of_versions = setup["versions"]

        from flamingo.model.convert_openflamingo import convert_openflamingo_state_dict
        from flamingo.model.vision import HFVisionEncoder
        from flamingo.model.weights import load_trainable_weights
        from safetensors.torch import load_file

        self.model = C.build_ours(lm, tokenizer, s, HFVisionEncoder.from_model(clip), s.vision_width).eval()
        of_state = load_file(str(self.workdir / "of_trainable.safetensors"))
        load_trainable_weights(self.model, convert_openflamingo_state_dict(of_state, self.model),
                               source="OpenFlamingo's randomised trainable weights")
        self.build_seconds = time.perf_counter() - t0
        self.notes.append("weights: OpenFlamingo's trainable weights randomised in the worker (gates tanh(0.5) / "
                          "tanh(-0.3)), saved, converted into ours with convert_openflamingo_state_dict + "
                          "load_trainable_weights")

    # ------------------------------------------------------------------------------ setup
    def _save_backbones(self, lm: Any, tokenizer: Any, clip: Any) -> None:
        from safetensors.torch import save_file

        d = self.workdir
        lm.save_pretrained(d / "lm")  # transformers 4.46.3 reads this config (checked by the logits check)
        (d / "tokenizer").mkdir()
        tokenizer.backend_tokenizer.save(str(d / "tokenizer" / "tokenizer.json"))
        specials = {k: getattr(tokenizer, k) for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
        (d / "tokenizer" / "special_tokens.json").write_text(json.dumps(specials))
        # transformers 5's CLIPVisionModel holds the tower's modules itself; 4.x nests them under
        # .vision_model: the worker loads these keys into that.
        (d / "clip").mkdir()
        cfg = clip.config
        keys = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "layer_norm_eps", "hidden_act", "num_channels", "projection_dim")
        (d / "clip" / "config.json").write_text(json.dumps({k: getattr(cfg, k) for k in keys}))
        tower = getattr(clip, "vision_model", clip)
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(d / "clip" / "tower.safetensors"))

    def set_task(self, task: Task, images: list) -> None:
        """Give the task to both sides: ours keeps the PIL images; the worker gets the pixel
        tensors our image processor makes of them."""
        import torch
        from safetensors.torch import save_file

        processor = self.model.vision_encoder.image_processor()
        pixels = torch.stack([processor.preprocess_image(im) for im in images])
        save_file({"pixels": pixels}, str(self.workdir / "pixels.safetensors"))
        (self.workdir / "task.json").write_text(json.dumps(asdict(task)))
        self.task, self.images = task, images
        self.worker.call("task")

    def support_prompt(self):
        from flamingo.inference import text_prompt

        return text_prompt(self.task.support_text, [self.images[i] for i in self.task.support_images])

    def query_prompts(self):
        from flamingo.inference import text_prompt

        return [text_prompt(t, [self.images[i]]) for t, i in zip(self.task.query_texts, self.task.query_images)]

    def full_prompt(self, query: int):
        from flamingo.inference import text_prompt

        t = self.task
        return text_prompt(t.support_text + t.query_texts[query],
                           [self.images[i] for i in t.support_images] + [self.images[t.query_images[query]]])

    # -------------------------------------------------------------------------- checking
    def check_prompt(self, query: int, greedy_tokens: int) -> dict:
        """Same ids, next-token logits and greedy tokens for support + query `query`: OF's
        full-prompt forward / generate vs ours through the few-shot context path (context
        encoded once, query appended with `extend`) and through one full-prompt encode."""
        from flamingo.inference import GenerationConfig, encode_prompts, extend, generate
        from safetensors.torch import load_file

        of = self.worker.call("check", query=query, greedy_tokens=greedy_tokens)
        of_logits = load_file(str(self.workdir / "of_check.safetensors"))["logits"]
        tok = self.model.tokenizer
        ours_ids = (tok(self.task.support_text)["input_ids"]
                    + tok(self.task.query_texts[query], add_special_tokens=False)["input_ids"])
        context = encode_prompts(self.model, [self.support_prompt()])
        state = extend(self.model, context, [self.query_prompts()[query]])
        full = encode_prompts(self.model, [self.full_prompt(query)])
        scale = of_logits.abs().max().item()
        diff_extend = (state.next_token_logits[0] - of_logits).abs().max().item()
        diff_full = (full.next_token_logits[0] - of_logits).abs().max().item()
        config = GenerationConfig(max_new_tokens=greedy_tokens, num_beams=1)
        greedy = generate(self.model, state, config)[0].token_ids
        of_greedy = cut_at(of["greedy"], {self.model.eoc_token_id})
        ok = ours_ids == of["prompt_ids"] and greedy == of_greedy and max(diff_extend, diff_full) <= 1e-4 * max(1, scale)
        line = (f"check (query {query}): prompt ids {'identical' if ours_ids == of['prompt_ids'] else 'DIFFER'} "
                f"({len(ours_ids)} tokens); next-token logits max |ours - OF| {diff_extend:.1e} (few-shot context "
                f"+ extend), {diff_full:.1e} (one encode), |logits| up to {scale:.2f}; greedy {greedy_tokens} tokens "
                f"{'identical' if greedy == of_greedy else f'DIFFER: ours {greedy} OF {of_greedy}'}")
        print(line + ("" if ok else "  <-- MISMATCH"), flush=True)
        return {"ok": ok, "line": line, "diff": max(diff_extend, diff_full)}

    # ---------------------------------------------------------------------------- timing
    def compare_timing(self, ours_fn: Callable[[], Any]) -> dict:
        """Warm-up (one run each; their outputs are returned for the equivalence check), then
        timed runs strictly alternating ours, OF, ours, OF, ... until `reps` clean (ours, OF)
        pairs, or 2 x reps pairs in all."""
        ours_out, ours_warm, _ = timed(ours_fn)
        of_warm = self.worker.call("run", want_outputs=True)
        print(f"warm-up: ours {ours_warm:.2f}s, OpenFlamingo {of_warm['seconds']:.2f}s", flush=True)
        pairs: list[tuple[dict[str, float], bool]] = []
        while sum(not busy for _, busy in pairs) < self.reps and len(pairs) < 2 * self.reps:
            _, ours_s, ours_others = timed(ours_fn)
            reply = self.worker.call("run")
            busy = max(ours_others, reply["others"]) > self.args.max_contention
            pairs.append(({"ours": ours_s, "of": reply["seconds"]}, busy))
            print(f"  rep {len(pairs)}: ours {ours_s:.3f}s, OpenFlamingo {reply['seconds']:.3f}s"
                  f"{'  (other processes busy: discarded)' if busy else ''}", flush=True)
        clean = [p for p, busy in pairs if not busy]
        used = clean if len(clean) >= min(3, self.reps) else [p for p, _ in pairs]
        times = {side: [p[side] for p in used] for side in ("ours", "of")}
        note = (f"{len(pairs) - len(clean)} of {len(pairs)} repetitions discarded (other processes used "
                f"> {self.args.max_contention} CPU cores meanwhile)")
        if used is not clean:
            note += "; too few clean ones, so ALL are used: TIMINGS UNRELIABLE (busy machine)"
        return {"ours_out": ours_out, "of_out": of_warm.get("outputs"), "times": times,
                "median": {k: statistics.median(v) for k, v in times.items()},
                "pair_ratio": statistics.median(p["of"] / p["ours"] for p in used), "note": note}

    def compare_memory(self, ours_fn: Callable[[], Any]) -> dict | None:
        if self.args.no_memory:
            return None
        return {"ours": measure_peak(ours_fn), "of": self.worker.call("memory")}

    # --------------------------------------------------------------------------- report
    def describe(self) -> None:
        s, v = self.sizes, self.of_versions
        import torch
        import transformers

        print(f"model: Llama LM vocab {s.vocab}, hidden {s.hidden}, {s.layers} blocks (ffn {s.intermediate}, "
              f"{s.heads} heads / {s.kv_heads} kv, tied embeddings); CLIP {s.image_size}px/patch {s.patch}, width "
              f"{s.vision_width}, {s.vision_layers} layers; OpenFlamingo bridge (resampler depth 6, 64 latents, "
              f"8x64 heads; xattn 8x64 heads before every {s.every}nd block)")
        print(f"ours: transformers {transformers.__version__}, torch {torch.__version__}; OpenFlamingo "
              f"{v['open_flamingo']}: transformers {v['transformers']}, torch {v['torch']} ({self.args.of_venv}); "
              f"{self.args.threads} threads each; built in {self.build_seconds:.1f}s")
        for note in self.notes:
            print(note)

    def report(self, timing: dict, memory: dict | None, label: str) -> None:
        med, times = timing["median"], timing["times"]
        print()
        print(f"{'side':<14}{'median s':>10}{'min':>9}{'max':>9}{'base RSS MiB':>14}{'peak +MiB':>11}")
        for side, name in (("ours", "ours"), ("of", "OpenFlamingo")):
            m = memory[side] if memory else None
            print(f"{name:<14}{med[side]:>10.3f}{min(times[side]):>9.3f}{max(times[side]):>9.3f}"
                  f"{(m['base_mib'] if m else float('nan')):>14.0f}{(m['delta_mib'] if m else float('nan')):>11.1f}")
        print(f"{timing['note']}; {len(times['ours'])} repetitions used; median of the per-repetition ratios "
              f"OF / ours: {timing['pair_ratio']:.2f}x")
        if memory:
            exact = memory["ours"]["exact"] and memory["of"]["exact"]
            print("peak +MiB: peak RSS of one run above the process's RSS just before it (built, warmed-up model), "
                  "each side in its own process (see _inference_common.measure_peak)"
                  + ("" if exact else "; VmHWM reset unavailable: lifetime peak used"))
            ratio = memory["of"]["delta_mib"] / max(memory["ours"]["delta_mib"], 1e-9)
            print(f"peak memory: ours {memory['ours']['delta_mib']:.1f} MiB, OpenFlamingo "
                  f"{memory['of']['delta_mib']:.1f} MiB ({ratio:.2f}x less)")
        print(f"{label} speedup vs OpenFlamingo: {med['of'] / med['ours']:.2f}x")

    def close(self) -> None:
        self.worker.close()
        if self.args.keep:
            print(f"(exchange directory kept: {self.workdir})")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def cut_at(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to (without) the first stop id: HF appends the stop token and pads."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return list(ids)
