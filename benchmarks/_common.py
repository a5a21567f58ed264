"""Shared helpers for the benchmarks: local tokenizer / LM / vision tower builders (no downloads),
OpenFlamingo import and construction, weight syncing, a synthetic interleaved batch, peak-RSS
measurement and a profiler-based time split. Imported by `benchmarks/*.py` (which put this folder
on sys.path)."""

from __future__ import annotations

import copy
import gc
import os
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()  # e.g. resize_token_embeddings' mean-resizing notice

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


# ------------------------------------------------------------------------------------ sizes
@dataclass
class Sizes:
    vocab: int = 49152  # SmolLM's vocabulary size
    hidden: int = 512
    layers: int = 8
    intermediate: int = 1536
    heads: int = 8
    kv_heads: int = 4
    tied: bool = True  # as SmolLM2 (our default LM) and OpenFlamingo's MPT LMs
    image_size: int = 224
    patch: int = 32
    vision_width: int = 256
    vision_layers: int = 4
    batch: int = 4
    seq: int = 256
    images: int = 3
    every: int = 2  # cross_attn_every_n_layers

    @classmethod
    def quick(cls) -> Sizes:
        return cls(vocab=4096, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2,
                   image_size=64, patch=16, vision_width=64, vision_layers=1, batch=2, seq=64, images=2)


# ------------------------------------------------------------------------------- tokenizer
def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    i += 26  # at least two letters
    while i:
        i, r = divmod(i, 26)
        out = letters[r] + out
    return out


def make_tokenizer(vocab_size: int):
    """A WordLevel tokenizer with exactly `vocab_size` entries (4 specials + synthetic words),
    built in memory with the `tokenizers` library. It has a pad token, so OpenFlamingo's factory
    adds no `<PAD>` row and both models add exactly `<|endofchunk|>`, `<image>` (ids V, V+1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for i in range(vocab_size - len(SPECIAL)):
        vocab[_word(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


# --------------------------------------------------------------------------------- backbones
def make_lm(s: Sizes, seed: int = 0) -> nn.Module:
    """A random Llama-architecture causal LM (SDPA attention), float32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, max_position_embeddings=max(2048, s.seq),
                      tie_word_embeddings=s.tied, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return lm.float()


def make_clip_vision(s: Sizes, seed: int = 1) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=s.image_size, patch_size=s.patch, hidden_size=s.vision_width,
                           intermediate_size=4 * s.vision_width, num_hidden_layers=s.vision_layers,
                           num_attention_heads=max(1, s.vision_width // 64))
    torch.manual_seed(seed)
    return CLIPVisionModel(cfg).eval()


# --------------------------------------------------------------------------- OpenFlamingo
def import_openflamingo():
    """OpenFlamingo's modules without open_clip (only its factory needs it)."""
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
    from open_flamingo.src.flamingo import Flamingo as OFFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    return OFFlamingo, FlamingoLMMixin, extend_instance


class OFVisionStub(nn.Module):
    """Stands in for open_clip's CLIP in OpenFlamingo: `.visual(x)` returns (pooled, patch_tokens).

    With `encoder` (our VisionEncoder) the tokens are that encoder's output for the same pixels,
    so both models pay the same vision cost and see the same features. With `features`
    (precomputed [K, S, D]) it ignores its input and returns them (neither model encodes)."""

    class _Visual(nn.Module):
        def __init__(self, encoder: nn.Module | None, features: torch.Tensor | None) -> None:
            super().__init__()
            self.encoder = encoder
            self.features = features

        def forward(self, x: torch.Tensor):
            if self.encoder is not None:
                tokens = self.encoder(x[:, None, None])[:, 0, 0]  # [K, 3, H, W] -> [K, S, D]
            else:
                tokens = self.features
            return tokens.mean(1), tokens

    def __init__(self, encoder: nn.Module | None = None, features: torch.Tensor | None = None) -> None:
        super().__init__()
        self.visual = self._Visual(encoder, features)


def build_openflamingo(lm: nn.Module, tokenizer: Any, vision_stub: nn.Module, vis_dim: int,
                       every: int, decoder_layers_attr_name: str = "model.layers"):
    """OpenFlamingo's `create_model_and_transforms`, minus open_clip and the hub: special tokens,
    FlamingoLMMixin, token-embedding resize, Flamingo(...), freezing as its factory does
    (perceiver, gated xattn layers and the LM input embeddings trainable:
    freeze_lm_embeddings=False, its default)."""
    OFFlamingo, FlamingoLMMixin, extend_instance = import_openflamingo()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(decoder_layers_attr_name)
    lm.resize_token_embeddings(len(tokenizer))
    model = OFFlamingo(vision_stub, lm, tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1],
                       vis_dim=vis_dim, cross_attn_every_n_layers=every)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------ ours
def build_ours(lm: nn.Module, tokenizer: Any, s: Sizes, vision_encoder: nn.Module | None,
               vis_dim: int):
    from flamingo.model.config import FlamingoConfig, LanguageModelConfig, VisionConfig
    from flamingo.model.flamingo import Flamingo

    config = FlamingoConfig.openflamingo(LanguageModelConfig(name_or_path="local-random-llama"),
                                         VisionConfig(kind="clip", name_or_path="local-random-clip"),
                                         cross_attn_every_n_layers=s.every)
    return Flamingo(config, lm, tokenizer, vision_encoder=vision_encoder,
                    vision_feature_dim=None if vision_encoder is not None else vis_dim)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ weight sync
def open_gates(of_model: nn.Module, attn: float = 0.5, ffw: float = -0.3) -> None:
    """OpenFlamingo's tanh gates start at 0 (xattn is then a no-op); open them so a loss
    comparison actually exercises the cross-attention and its masking."""
    with torch.no_grad():
        for layer in of_model.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.fill_(attn)
                layer.ff_gate.fill_(ffw)


def sync_weights(ours: nn.Module, of: nn.Module) -> None:
    """Copy OpenFlamingo's trainable weights into ours, through the repository's converter."""
    from flamingo.model.convert_openflamingo import convert_openflamingo_state_dict
    from flamingo.model.weights import load_trainable_weights

    state = {k: v.detach().clone() for k, v in of.state_dict().items()}
    load_trainable_weights(ours, convert_openflamingo_state_dict(state, ours), source="converted OpenFlamingo state dict")


# ----------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor  # [B, N, 1, 3, H, W]


def make_batch(s: Sizes, eoc_id: int, media_id: int, seed: int = 2) -> Batch:
    """B samples of L tokens, OpenFlamingo style: a short text prefix, then per image
    `<image> text... <|endofchunk|>`; random word ids for the text; labels = input ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), s.vocab, (s.batch, s.seq), generator=g)
    ids[:, 0] = 1  # <s>
    prefix = min(8, s.seq // (4 * s.images))
    chunk = (s.seq - 1 - prefix) // s.images
    for j in range(s.images):
        start = 1 + prefix + j * chunk
        ids[:, start] = media_id
        ids[:, start + chunk - 1] = eoc_id
    pixels = torch.randn(s.batch, s.images, 1, 3, s.image_size, s.image_size, generator=g)
    return Batch(ids, torch.ones_like(ids), ids.clone(), pixels)


# -------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def release_memory() -> None:
    gc.collect()
    try:  # give glibc's free lists back to the OS so RSS reflects live tensors
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------- time split
class ScopeHooks:
    """Wraps given modules' forwards in profiler ranges (`record_function`), so a profiled step
    can be split by component; backward work is attributed to the component whose forward op
    created it (autograd sequence numbers)."""

    def __init__(self, scopes: dict[str, list[nn.Module]]) -> None:
        from torch.autograd.profiler import record_function

        self.names = list(scopes)
        self.handles = []
        for name, modules in scopes.items():
            for module in modules:
                stack: list[Any] = []

                def pre(_m, _a, name=name, stack=stack):
                    rf = record_function(f"@scope:{name}")
                    rf.__enter__()
                    stack.append(rf)

                def post(_m, _a, _o, stack=stack):
                    stack.pop().__exit__(None, None, None)

                self.handles.append(module.register_forward_pre_hook(pre))
                self.handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_split(step: Callable[[], Any], scopes: dict[str, list[nn.Module]]) -> dict[str, tuple[float, float]]:
    """Profile one step; returns {component: (forward ms, backward ms)} incl. 'other' and 'total'.

    Forward ms of a component: wall time inside its modules' forwards. Backward ms: time of the
    autograd nodes whose forward op ran inside it. 'loss': cross-entropy (log-softmax + NLL).
    'other': the rest (logits reshaping/copies outside modules, masks, rotary embeddings, final
    norm, glue, gradient accumulation)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    hooks = ScopeHooks(scopes)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("@phase:step"):
            step()
    finally:
        hooks.remove()
    events = list(prof.events())
    scope_ranges = [(e.time_range.start, e.time_range.end, e.name.split(":", 1)[1])
                    for e in events if e.name.startswith("@scope:")]
    step_ev = next(e for e in events if e.name == "@phase:step")
    fwd = defaultdict(float)
    for start, end, name in scope_ranges:
        fwd[name] += (end - start) / 1e3
    # forward op -> scope through sequence numbers. Ops that create no autograd node are recorded
    # with the *next* node's number, so the node's own op is the last one carrying it.
    bwd_events = [e for e in events if e.name.startswith("autograd::engine::evaluate_function:")]
    bwd_start = min((e.time_range.start for e in bwd_events), default=step_ev.time_range.end)
    last_op: dict[int, float] = {}
    for e in events:
        if e.sequence_nr < 0 or e.name.startswith("autograd::") or e.time_range.start >= bwd_start:
            continue
        last_op[e.sequence_nr] = max(last_op.get(e.sequence_nr, -1.0), e.time_range.start)
    seq_scope: dict[int, str] = {}
    for seq, t in last_op.items():
        inside = [(end - start, name) for start, end, name in scope_ranges if start <= t <= end]
        seq_scope[seq] = min(inside)[1] if inside else "other"
    bwd = defaultdict(float)
    for e in bwd_events:
        bwd[seq_scope.get(e.sequence_nr, "other")] += e.cpu_time_total / 1e3
    # The loss (log-softmax + NLL over the vocabulary) is no module: recognise it by op names.
    for e in events:
        if e.name == "aten::cross_entropy_loss" and e.time_range.start < bwd_start:
            fwd["loss"] += e.cpu_time_total / 1e3
    for e in bwd_events:
        if e.name.endswith(("LogSoftmaxBackward0", "NllLossBackward0")):
            bwd["loss"] += e.cpu_time_total / 1e3
            bwd[seq_scope.get(e.sequence_nr, "other")] -= e.cpu_time_total / 1e3
    fwd_total = (bwd_start - step_ev.time_range.start) / 1e3
    bwd_total = (step_ev.time_range.end - bwd_start) / 1e3
    fwd["other"] = fwd_total - sum(v for k, v in fwd.items() if k != "other")
    bwd["other"] = bwd_total - sum(v for k, v in bwd.items() if k != "other")
    result = {name: (fwd.get(name, 0.0), bwd.get(name, 0.0)) for name in [*scopes, "loss", "other"]}
    result["total"] = (fwd_total, bwd_total)
    return result


# ------------------------------------------------------------------------------ contention
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest is in user)
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy / _CLK_TCK, (int(own[11]) + int(own[12])) / _CLK_TCK  # utime + stime


class ContentionMeter:
    """How much CPU other processes used while a block ran (machine busy time minus ours)."""

    def __enter__(self) -> Self:
        self._busy, self._own = _cpu_seconds()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _cpu_seconds()
        self.wall = time.perf_counter() - self._t
        self.others = max(0.0, (busy - self._busy) - (own - self._own))  # CPU seconds

    @property
    def others_fraction(self) -> float:
        """Other processes' CPU use during the block, in cores (0.5 = half a core on average)."""
        return self.others / max(self.wall, 1e-9)


def copy_lm(lm: nn.Module) -> nn.Module:
    return copy.deepcopy(lm)
