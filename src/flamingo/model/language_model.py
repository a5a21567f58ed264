"""Adapting a frozen Hugging Face causal LM: its decoder stack, special tokens, loading.

Nothing here knows model names: the decoder stack is found from the module structure, the
embeddings through `get_input_embeddings`/`get_output_embeddings`, and the hidden size from
the config, so Llama, Mistral, Qwen2, Gemma 3, GPT-2, GPT-NeoX, OPT, MPT, ... work unchanged,
keeping their own KV cache and attention implementation.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.errors import UserError, cannot_load
from flamingo.model.config import LanguageModelConfig
from flamingo.model.cross_attention import GatedCrossAttentionBlock, MediaContext
from flamingo.model.lm_source import converted_gguf_checkpoint, dtype_argument, resolve_package_path

# The keyword argument that carries a call's `MediaContext` through the LM's forward to our layers.
MEDIA_ARGUMENT = "flamingo_media"


class DecoderStackNotFound(UserError):
    """The LM's list of decoder blocks could not be located."""


def find_decoder_layers(lm: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the LM's decoder blocks.

    Without `path`, the stack is the ModuleList whose length equals the config's number of
    hidden layers, made of blocks of one class (the largest such list if there are several).
    """
    if path is not None:
        module: Any = lm
        for part in path.split("."):
            if not hasattr(module, part):
                raise DecoderStackNotFound(
                    f"lm.decoder_layers_path {path!r}: {type(lm).__name__} has no attribute path {part!r}")
            module = getattr(module, part)
        if not isinstance(module, nn.ModuleList):
            raise DecoderStackNotFound(
                f"lm.decoder_layers_path {path!r}: expected an nn.ModuleList, got {type(module).__name__}")
        return path, module

    num_layers = getattr(_text_config(lm), "num_hidden_layers", None)
    candidates = []
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((size, name, module))
    if not candidates:
        lists = [f"{n} (len {len(m)})" for n, m in lm.named_modules() if isinstance(m, nn.ModuleList)]
        raise DecoderStackNotFound(
            f"could not find the decoder stack of {type(lm).__name__}: expected an nn.ModuleList of "
            f"{num_layers} identical blocks, found {lists or 'no ModuleList'}; "
            f"set lm.decoder_layers_path in the config")
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def _text_config(lm: nn.Module) -> Any:
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(lm: nn.Module) -> int:
    config = _text_config(lm)
    for attr in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise UserError(f"cannot read the hidden size of {type(lm).__name__} from its config")


class FlamingoDecoderLayer(nn.Module):
    """A frozen LM block with a GATED XATTN-DENSE layer in front of it.

    The media of a call arrive as the `MEDIA_ARGUMENT` keyword argument (decoder stacks that
    hand their keyword arguments on to their blocks) or, for stacks that drop them, as `media`,
    set on the layer for the duration of the call (`media_on_layers`). Without media (the LM
    called on its own) the block is exactly the LM's.
    """

    def __init__(self, decoder_layer: nn.Module, cross_attn: GatedCrossAttentionBlock, layer_idx: int) -> None:
        super().__init__()
        self.decoder_layer = decoder_layer
        self.cross_attn = cross_attn
        self.layer_idx = layer_idx
        self.media: MediaContext | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        media: MediaContext | None = kwargs.pop(MEDIA_ARGUMENT, None) or self.media
        if media is not None:
            if args:
                args = (self.cross_attn(args[0], media, self.layer_idx), *args[1:])
            else:
                kwargs["hidden_states"] = self.cross_attn(kwargs["hidden_states"], media, self.layer_idx)
        return self.decoder_layer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # LM code reads attributes of its blocks (e.g. `attention_type`); answer for the block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decoder_layer"), name)


@contextlib.contextmanager
def media_on_layers(layers: Sequence[FlamingoDecoderLayer], media: MediaContext) -> Iterator[None]:
    """Give `media` to the layers for one LM call whose decoder stack drops keyword arguments
    (MPT's), so the media cannot travel as `MEDIA_ARGUMENT`; always taken back on exit."""
    if any(layer.media is not None for layer in layers):
        raise RuntimeError("these Flamingo layers are already running a call (one model called from two "
                           "threads at once?)")
    for layer in layers:
        layer.media = media
    try:
        yield
    finally:
        for layer in layers:
            layer.media = None


class DecoupledEmbedding(nn.Module):
    """The frozen token embedding plus trainable rows for tokens added after it.

    The added ids read the trainable `new_rows`; all others read the frozen table (ids outside
    both raise a `UserError`). Only
    the new rows receive gradients, and the frozen table gets none at all (no masking of a full
    gradient).
    """

    def __init__(self, base: nn.Module, first_new_id: int, num_new: int) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        # Raw table rows (mean of the existing ones), so a tied output head can share them.
        mean_row = base.weight.detach()[:first_new_id].float().mean(0)
        self.new_rows = nn.Parameter(mean_row.expand(num_new, -1).clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        """Valid ids: the frozen table's rows, and the added ids (which may lie beyond it)."""
        return max(self.base.weight.shape[0], self.first_new_id + self.new_rows.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        bad = (input_ids < 0) | (input_ids >= self.vocab_size)
        if bad.any():  # never let an out-of-range id read a neighbouring row
            raise UserError(f"token id {int(input_ids[bad][0])} is outside the vocabulary "
                            f"(ids 0..{self.vocab_size - 1}, {self.vocab_size} in all)")
        new_index = input_ids - self.first_new_id
        is_new = (new_index >= 0) & (new_index < self.new_rows.shape[0])
        frozen = self.base(input_ids.masked_fill(is_new, 0))
        new = F.embedding(new_index.clamp(0, self.new_rows.shape[0] - 1), self.new_rows)
        scale = getattr(self.base, "embed_scale", None)  # embeddings that scale their rows (Gemma)
        if scale is not None:
            new = new * scale.to(new.dtype) if torch.is_tensor(scale) else new * scale
        new = new.to(frozen.dtype)
        return torch.where(is_new[..., None], new, frozen)


class DecoupledLMHead(nn.Module):
    """The frozen output projection plus trainable output rows for the added tokens.

    The logits of the added ids come from `new_rows` (so the model can predict `<|endofchunk|>`);
    all other logits are the frozen LM's, unchanged. When the LM ties its input and output
    embeddings, the added rows are tied too.
    """

    def __init__(self, base: nn.Module, first_new_id: int, num_new: int,
                 tied_rows: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.num_new = num_new
        if tied_rows is not None:
            self.new_rows = tied_rows
        else:
            self.new_rows = nn.Parameter(base.weight.detach().float().mean(0).expand(num_new, -1).clone())
        bias = getattr(base, "bias", None)
        self.new_bias = (nn.Parameter(bias.detach().float().mean().expand(num_new).clone())
                         if bias is not None else None)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = _few_rows_linear(self.base, hidden)
        bias = None if self.new_bias is None else self.new_bias.to(hidden.dtype)
        new = F.linear(hidden, self.new_rows.to(hidden.dtype), bias).to(logits.dtype)
        start, end = self.first_new_id, self.first_new_id + self.num_new
        # The added ids sit right after the tokenizer's vocabulary: either beyond the frozen
        # table (appended) or over its unused padding rows (replaced).
        if start == logits.shape[-1]:  # appended: no slice (a full-width slice costs a copy in backward)
            return torch.cat([logits, new], dim=-1)
        return torch.cat([logits[..., :start], new, logits[..., end:]], dim=-1)


def _few_rows_linear(linear: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`linear(hidden)`, faster for the few rows of cached decoding (beams) on CPU.

    For 2-3 rows, CPU `F.linear` runs one matrix-vector product per row, each reading the whole
    [V, D] output table (100 MB for a 49k x 512 head), and for 4-16 rows it is still slow;
    `W @ h^T` reads the table once (2 threads, 49k x 512: 3 rows 18.6 ms -> 2.7 ms, 8 rows
    10.6 -> 4.5 ms). One row is computed as two: a one-column product is a matrix-vector product
    again (6.2 ms), two columns take 1.9 ms. Inference only (no grad), plain `nn.Linear` only;
    anything else goes through the module unchanged.
    """
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    if (type(linear) is not nn.Linear or not 1 <= rows <= 16 or hidden.device.type != "cpu"
            or torch.is_grad_enabled() or hidden.dtype != linear.weight.dtype):
        return linear(hidden)
    flat = hidden.reshape(rows, hidden.shape[-1])
    if rows == 1:  # one column is a matrix-vector product again: compute it twice, as a matrix product
        flat = flat.repeat(2, 1)
    out = torch.mm(linear.weight, flat.t()).t()[:rows]
    if linear.bias is not None:
        out = out + linear.bias
    return out.reshape(*hidden.shape[:-1], out.shape[-1])


# Config fields of LMs that change their logits after the output head, with their neutral value.
_LOGIT_POSTPROCESSING_FIELDS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@dataclass(frozen=True)
class LMForward:
    """How a causal LM's forward behaves, found once when Flamingo is built (`inspect_lm_forward`).

    passes_layer_kwargs: extra keyword arguments given to the LM reach its decoder blocks (Llama,
        Qwen2, Gemma 3, GPT-2, ... in recent transformers; not MPT), so the media can travel as
        an argument.
    head_logits_unchanged: the LM returns `head(base_model(...)[0])` as it is, so the training
        loss can be computed from the base model's last hidden state through our own head;
        False when the LM scales or soft-caps its logits after the head (named in the config,
        e.g. Gemma 2's `final_logit_softcapping`, or seen in the check below).
    postprocessing: why not, when `head_logits_unchanged` is False.
    """

    passes_layer_kwargs: bool
    head_logits_unchanged: bool
    postprocessing: str | None = None


def forward_parameters(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def inspect_lm_forward(lm: nn.Module, layer: nn.Module) -> LMForward:
    """Run the LM once on two tokens, as it is (before Flamingo changes it), and watch whether an
    extra keyword argument reaches `layer` (one of its decoder blocks), and whether the logits it
    returns are its output head's output on its base model's last hidden state."""
    if lm.get_input_embeddings().weight.device.type == "meta":  # shapes only (parameter counts): nothing to run
        return LMForward(passes_layer_kwargs=False, head_logits_unchanged=False,
                         postprocessing="not inspected (built on the meta device)")
    config = _text_config(lm)
    named = [f"{name}={getattr(config, name)!r}" for name, neutral in _LOGIT_POSTPROCESSING_FIELDS.items()
             if getattr(config, name, neutral) not in (None, neutral)]
    head, base = lm.get_output_embeddings(), lm.base_model
    seen: dict[str, Any] = {}
    marker = object()

    def layer_called(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.setdefault("kwarg", kwargs.get(MEDIA_ARGUMENT) is marker)

    def head_returned(_module: nn.Module, args: Any, out: Any) -> None:
        seen.update(head_in=args[0], head_out=out)

    hooks = [layer.register_forward_pre_hook(layer_called, with_kwargs=True)]
    if head is not None:
        hooks.append(head.register_forward_hook(head_returned))
    ids = torch.zeros(1, 2, dtype=torch.long, device=lm.get_input_embeddings().weight.device)
    try:
        with torch.no_grad():
            try:
                logits = lm(input_ids=ids, use_cache=False, **{MEDIA_ARGUMENT: marker}).logits
            except TypeError:  # the LM's forward takes no extra keyword arguments
                seen.pop("kwarg", None)
                logits = lm(input_ids=ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        unchanged = ("head_out" in seen and base is not lm and torch.equal(seen["head_out"].float(), logits.float())
                     and torch.equal(base(input_ids=ids)[0], seen["head_in"]))
    reason = (", ".join(named) if named else None if unchanged
              else "its logits are not its output head's output on its base model's last hidden state")
    return LMForward(passes_layer_kwargs=bool(seen.get("kwarg")), head_logits_unchanged=unchanged and not named,
                     postprocessing=reason)


def add_special_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add `tokens` (in this order, as OpenFlamingo does) and return their ids. Tokenizers without
    a pad token get the EOS token as pad (no new embedding row for padding)."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RemoteCodeError(UserError):
    """A config asks to run the code that comes with a model, and the user did not allow it."""


def load_language_model(config: LanguageModelConfig, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load the frozen LM and its tokenizer from the hub, a local directory, or a GGUF file inside an
    installed package (converted once into a cached checkpoint; see flamingo.model.lm_source).

    `config.trust_remote_code` only says that the LM needs its own Python code; that code runs only
    when the caller passes `trust_remote_code=True` (a config may come from anywhere, e.g. the hub).
    """
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoModelForCausalLM

    if config.trust_remote_code and not trust_remote_code:
        raise RemoteCodeError(
            f"lm.trust_remote_code is true: loading the language model {str(config.name_or_path)[:200]!r} would run "
            f"Python code that comes with it; pass --trust-remote-code (command line) or trust_remote_code=True "
            f"(Python) if you trust its source")
    source = resolve_package_path(config.name_or_path)
    if config.gguf_file:
        source = str(converted_gguf_checkpoint(source, config.gguf_file))
    common = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
    tokenizer = _load_tokenizer(config, source, common)
    kwargs: dict[str, Any] = dict(common, **{dtype_argument(): _DTYPES[config.dtype]})
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, HFValidationError) as err:
        raise cannot_load("lm.name_or_path", source, err) from None
    except ValueError as err:
        _check_remote_code_refusal(err, source)
        # Some architectures (e.g. MPT) have no SDPA path; they keep their own attention.
        if "attn_implementation" not in kwargs or "does not support" not in str(err):
            field = "lm.attn_implementation" if "attn_implementation" in str(err) else "lm.name_or_path"
            raise cannot_load(field, source, err) from None
        kwargs.pop("attn_implementation")
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return lm, tokenizer


def _check_remote_code_refusal(err: ValueError, source: str) -> None:
    """transformers refuses (with a plain ValueError) to load a model or tokenizer whose code comes
    with it unless trust_remote_code is set: say so as a user error, naming the config field."""
    if "trust_remote_code" in str(err):
        raise RemoteCodeError(
            f"lm.name_or_path: {str(source)[:200]!r} comes with its own Python code, which transformers needs to "
            f"load it; set lm.trust_remote_code: true in the model config and pass --trust-remote-code (command "
            f"line) or trust_remote_code=True (Python), if you trust its source") from None


class TokenizerNotFound(UserError):
    """The tokenizer named by the config (`lm.tokenizer`, or the LM's location) cannot be read."""


def _load_tokenizer(config: LanguageModelConfig, lm_source: str, common: dict[str, Any]) -> Any:
    """The tokenizer at `lm.tokenizer`, or with the LM (`lm_source`) when that is not set."""
    from transformers import AutoTokenizer

    field = "lm.tokenizer" if config.tokenizer else "lm.name_or_path (no lm.tokenizer given)"
    if config.tokenizer:
        source, common = resolve_package_path(config.tokenizer), dict(common, revision=None)
    else:
        source = lm_source
    try:
        return AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as err:  # no tokenizer files there, unreadable ones, unknown hub id
        if isinstance(err, ValueError):
            _check_remote_code_refusal(err, source)
        detail = " ".join(str(err).split())
        detail = detail[:300] + (" ..." if len(detail) > 300 else "")
        shown = source if len(source) <= 200 else source[:200] + "..."
        raise TokenizerNotFound(f"{field}: no readable tokenizer at {shown!r} ({type(err).__name__}: {detail}); "
                                f"set lm.tokenizer to a directory or hub id holding one") from None

