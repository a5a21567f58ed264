"""An encoded prompt batch that can be continued: the explicit cache of inference.

`encode_prompts` runs prompts once; `extend` continues one encoded few-shot context with many
queries without re-running the context (paper D.1: cost linear in the number of shots);
`FlamingoState.step` feeds new tokens; `repeat_rows`/`reorder` serve beam search and scoring.

What the state holds:
- the LM's own KV cache (one row per sequence),
- the visual tokens of the media rows, and per layer the cross-attention keys/values of those
  tokens, computed once. Several consecutive sequences may share one media row (the beams of a
  sample, the candidates of a prompt): they index it, nothing is copied per sequence;
- for the other members of the family (`flamingo.model.families`): the key mask of the media
  rows (Llama 3.2 Vision's padding tiles); under "group" attention, the first image of the
  group each sequence's last token sees, so that a continuation sees that whole group; and under
  `cross_attention.no_media_after_eos` (IDEFICS), the image a continuation's text sees before its
  own first image: none after an end-of-sequence token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from flamingo.inference.family import encode_media_of, family_io
from flamingo.inference.prompt import Prompt, PromptError, context_length
from flamingo.model.cross_attention import MediaContext, group_first_media
from flamingo.model.flamingo import Flamingo


@dataclass
class FlamingoState:
    past_key_values: Any  # the LM's cache, batch B
    attention_mask: torch.Tensor  # [B, T] over everything seen so far (0 = padding)
    visual_tokens: torch.Tensor  # [B_media, M, R, D]; B_media divides B
    num_media: torch.Tensor  # [B_media] real media per media row (all consumed by the prompt)
    next_token_logits: torch.Tensor  # [B, V] the prediction after the last token
    kv_cache: dict  # layer index -> cross-attention keys/values of visual_tokens
    key_mask: torch.Tensor | None = None  # [B_media, M, R] False: a visual token images' text must not see
    group_first: torch.Tensor | None = None  # [B] "group" attention: the first image the last token sees
    media_seen: torch.Tensor | None = None  # [B] no_media_after_eos: the image (0: none) the next token sees

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def rows_per_media(self) -> int:
        return self.batch_size // self.visual_tokens.shape[0]

    def media_offset(self) -> torch.Tensor:
        return self.num_media.repeat_interleave(self.rows_per_media)

    def step(self, model: Flamingo, token_ids: torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Feed token_ids [B, k] (no images); update the state; return their logits [B, kept, V]."""
        mask = torch.cat([self.attention_mask, torch.ones_like(token_ids)], dim=1)
        media, self.group_first, self.media_seen = media_context(
            model, token_ids, self.visual_tokens, self.num_media, self.kv_cache, self.key_mask, self.media_offset(),
            self.group_first, self.media_seen)
        out = model.logits_and_cache(token_ids, media, attention_mask=mask, past_key_values=self.past_key_values,
                                     use_cache=True, logits_to_keep=logits_to_keep)
        self.past_key_values, self.attention_mask = out.past_key_values, mask
        self.next_token_logits = out.logits[:, -1]
        return out.logits

    def repeat_rows(self, times: int) -> "FlamingoState":
        """A new state with every sequence repeated `times` times in a row (the LM cache is
        copied; media rows are shared, not copied)."""
        cache = _copy_cache(self.past_key_values)
        cache.batch_repeat_interleave(times)
        return FlamingoState(cache, self.attention_mask.repeat_interleave(times, 0), self.visual_tokens,
                             self.num_media, self.next_token_logits.repeat_interleave(times, 0), self.kv_cache,
                             self.key_mask, _rows(self.group_first, lambda g: g.repeat_interleave(times, 0)),
                             _rows(self.media_seen, lambda m: m.repeat_interleave(times, 0)))

    def select_rows(self, rows: torch.Tensor, keep_logits: bool = True) -> "FlamingoState":
        """A new state made of the given sequences (any order, repeats allowed). Media rows are
        shared when the selection keeps whole runs of equal media; otherwise they are gathered.
        keep_logits=False leaves next_token_logits empty (for a caller that steps at once)."""
        rows = rows.to(self.attention_mask.device)
        cache = _copy_cache(self.past_key_values)
        cache.batch_select_indices(rows)
        media_rows = rows // self.rows_per_media
        runs = torch.unique_consecutive(media_rows, return_counts=True)
        shareable = (runs[1] == runs[1][0]).all() and len(runs[0]) * int(runs[1][0]) == len(rows)
        index = runs[0] if shareable else media_rows
        kv = {layer: (k[index], v[index]) for layer, (k, v) in self.kv_cache.items()}
        logits = self.next_token_logits[rows] if keep_logits else self.next_token_logits[:0]
        return FlamingoState(cache, self.attention_mask[rows], self.visual_tokens[index], self.num_media[index],
                             logits, kv, _rows(self.key_mask, lambda m: m[index]),
                             _rows(self.group_first, lambda g: g[rows]), _rows(self.media_seen, lambda m: m[rows]))

    def reorder(self, rows: torch.Tensor) -> None:
        """In place: sequence i becomes sequence rows[i]. Rows must stay within their media row
        (as beam search guarantees: a beam only continues beams of the same sample)."""
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return  # every beam continues itself: nothing moves
        self.past_key_values.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_token_logits = self.next_token_logits[rows]
        self.group_first = _rows(self.group_first, lambda g: g[rows])
        self.media_seen = _rows(self.media_seen, lambda m: m[rows])

    def media_per_sequence(self) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        """visual_tokens, num_media, cross-attention keys/values and the key mask (all True when
        the state has none) with one media row per sequence (shared rows are repeated)."""
        share = self.rows_per_media
        key_mask = self.key_mask if self.key_mask is not None else torch.ones(
            self.visual_tokens.shape[:3], dtype=torch.bool, device=self.visual_tokens.device)
        if share == 1:
            return self.visual_tokens, self.num_media, self.kv_cache, key_mask
        kv = {layer: (k.repeat_interleave(share, 0), v.repeat_interleave(share, 0))
              for layer, (k, v) in self.kv_cache.items()}
        return (self.visual_tokens.repeat_interleave(share, 0), self.num_media.repeat_interleave(share), kv,
                key_mask.repeat_interleave(share, 0))

    @staticmethod
    def concat(states: Sequence["FlamingoState"]) -> "FlamingoState":
        """One state holding the sequences of all `states`, in order (e.g. requests joining a
        running decode batch). Shorter histories are left-padded, masked, to the longest; every
        sequence gets its own media row, padded to the most media slots (padding slots lie beyond
        its `num_media`, so no token attends to them)."""
        if len(states) == 1:
            return states[0]
        cache, mask = _concat_histories(states)
        media = [s.media_per_sequence() for s in states]
        slots = max(tokens.shape[1] for tokens, _, _, _ in media)
        visual_tokens = _cat_padded([tokens for tokens, _, _, _ in media], slots, dim=1)
        kv = {}
        for layer in sorted({layer for _, _, layer_kv, _ in media for layer in layer_kv}):
            like = next(layer_kv[layer][0] for _, _, layer_kv, _ in media if layer in layer_kv)
            width = slots * visual_tokens.shape[2]  # keys per row: slots x tokens per media
            parts = [layer_kv.get(layer) or (like.new_zeros(len(tokens), like.shape[1], 0, like.shape[3]),) * 2
                     for tokens, _, layer_kv, _ in media]
            kv[layer] = (_cat_padded([k for k, _ in parts], width, dim=2),
                         _cat_padded([v for _, v in parts], width, dim=2))
        logits = torch.cat([s.next_token_logits for s in states])
        key_mask = None
        if any(s.key_mask is not None for s in states):  # padding slots: seen by no token with an image
            key_mask = _cat_padded([m for _, _, _, m in media], slots, dim=1)
        group_first = None if states[0].group_first is None else torch.cat([s.group_first for s in states])
        media_seen = None if states[0].media_seen is None else torch.cat([s.media_seen for s in states])
        return FlamingoState(cache, mask, visual_tokens, torch.cat([n for _, n, _, _ in media]), logits, kv,
                             key_mask, group_first, media_seen)

    def without_leading_padding(self) -> "FlamingoState":
        """The same sequences without the leading positions that are padding in every row (left
        behind when the longest sequences of a batch leave it)."""
        real = self.attention_mask.any(0).nonzero()
        start = int(real[0, 0]) if len(real) else self.length
        if start == 0:
            return self
        layers = [(k[:, :, start:], v[:, :, start:]) for k, v in _cache_layers(self.past_key_values)]
        return FlamingoState(_cache_from_layers(self.past_key_values, layers), self.attention_mask[:, start:],
                             self.visual_tokens, self.num_media, self.next_token_logits, self.kv_cache,
                             self.key_mask, self.group_first, self.media_seen)

    def nbytes(self) -> int:
        """Memory held by the state's tensors."""
        tensors = [t for keys, values, *_ in self.past_key_values for t in (keys, values)]
        tensors += [self.attention_mask, self.visual_tokens, self.num_media, self.next_token_logits]
        tensors += [t for kv in self.kv_cache.values() for t in kv]
        tensors += [t for t in (self.key_mask, self.group_first, self.media_seen) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _rows(tensor: torch.Tensor | None, select: Any) -> torch.Tensor | None:
    """`select(tensor)`, or None for an optional tensor the state does not have."""
    return None if tensor is None else select(tensor)


def media_context(model: Flamingo, ids: torch.Tensor, visual_tokens: torch.Tensor, num_media: torch.Tensor,
                  kv_cache: dict, key_mask: torch.Tensor | None = None, media_offset: torch.Tensor | None = None,
                  group_first: torch.Tensor | None = None, media_seen: torch.Tensor | None = None
                  ) -> tuple[MediaContext, torch.Tensor | None, torch.Tensor | None]:
    """`Flamingo.media_context` for `ids` continuing sequences whose last token saw the group of
    images from `group_first` on ("group" attention: the group goes on until text follows an
    image) and whose next token sees image `media_seen` (`cross_attention.no_media_after_eos`: 0
    after an end-of-sequence token). Also returns both for each row's last token, for the next
    call (None where the model's masking has no groups, or no such switch)."""
    no_media_after_eos = model.config.cross_attention.no_media_after_eos
    media = model.media_context(ids, visual_tokens, num_media=num_media, media_offset=media_offset,
                                kv_cache=kv_cache, key_mask=key_mask,
                                media_seen=_rows(media_seen, lambda m: m.to(ids.device)))
    seen_after = model.media_after(ids, media) if no_media_after_eos else None
    if media.token_first_media is None:
        return media, None, seen_after
    if group_first is not None:
        media.token_first_media = group_first_media(ids == model.media_token_id, media.token_media,
                                                    group_first.to(ids.device))
    return media, media.token_first_media[:, -1], seen_after


def _cat_padded(parts: Sequence[torch.Tensor], size: int, dim: int, left: bool = False) -> torch.Tensor:
    """`parts` concatenated along dimension 0, each zero-padded on one side of `dim` to `size`,
    written once into one new tensor (a pad then a concatenation would copy everything twice:
    these are the batch's caches and cross-attention keys/values)."""
    shape = list(parts[0].shape)
    shape[0], shape[dim] = sum(part.shape[0] for part in parts), size
    out = parts[0].new_empty(shape)
    row = 0
    for part in parts:
        rows, width = out[row:row + part.shape[0]], part.shape[dim]
        rows.narrow(dim, size - width if left else 0, width).copy_(part)
        rows.narrow(dim, 0 if left else width, size - width).zero_()  # only the padding is zeroed
        row += part.shape[0]
    return out


def _concat_histories(states: Sequence[FlamingoState], repeats: Sequence[int] | None = None
                      ) -> tuple[Any, torch.Tensor]:
    """The LM caches and attention masks of `states`, one after the other, the shorter histories
    left-padded (masked) to the longest. With `repeats`, state i (of batch size 1) is repeated
    `repeats[i]` times."""
    length = max(state.length for state in states)
    counts = repeats or [None] * len(states)

    def fit(tensor: torch.Tensor, count: int | None) -> torch.Tensor:
        return tensor if count is None else tensor.expand(count, *tensor.shape[1:])

    layers = []
    for per_state in zip(*[_cache_layers(state.past_key_values) for state in states]):  # one layer
        layers.append(tuple(_cat_padded([fit(kv[part], count) for kv, count in zip(per_state, counts)], length,
                                        dim=2, left=True) for part in (0, 1)))
    mask = _cat_padded([fit(state.attention_mask, count) for state, count in zip(states, counts)], length, dim=1,
                       left=True)
    return _cache_from_layers(states[0].past_key_values, layers), mask


def has_windowed_attention(model: Flamingo) -> bool:
    """Whether some LM layers attend within a window (sliding-window or chunked attention): their
    caches cannot be padded and concatenated (`FlamingoState.concat`, `without_leading_padding`)."""
    config = model.lm.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return any("sliding" in str(kind) or "chunked" in str(kind) for kind in kinds)
    # Configs without layer_types: one setting for every layer (as transformers infers the cache layers).
    windowed = any(getattr(config, attr, None) is not None for attr in ("sliding_window", "attention_chunk_size"))
    return windowed and getattr(config, "use_sliding_window", True) is not False


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys/values [B, heads, T, head_dim] of each layer of a Hugging Face dynamic cache
    (iterating one gives (keys, values) per layer, then also its sliding window in transformers 5)."""
    layers = []
    for keys, values, *sliding_window in cache:
        if sliding_window and sliding_window[0] is not None:
            raise NotImplementedError("padding and concatenating LM caches needs full attention in every layer; "
                                      "this LM has sliding-window layers")
        layers.append((keys, values))
    return layers


def _cache_from_layers(like: Any, layers: list[tuple[torch.Tensor, ...]]) -> Any:
    """A cache of the type of `like` holding the given keys/values (and sliding window) per layer,
    built through the public constructor."""
    if "ddp_cache_data" in inspect.signature(type(like)).parameters:
        return type(like)(ddp_cache_data=layers)
    return type(like).from_legacy_cache(tuple(layers))  # transformers < 4.47


def _copy_cache(cache: Any) -> Any:
    """A new LM cache over the same keys/values, for a new state: the public `Cache` methods that
    repeat, select and reorder rows change the cache they are called on (never its tensors in
    place). Rebuilt from what iterating the cache yields per layer."""
    return _cache_from_layers(cache, list(cache))


def _left_padded(model: Flamingo, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [B, L] of token id lists."""
    if any(len(r) == 0 for r in rows):
        raise PromptError("a prompt is empty: it needs at least one token")
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _tokenize(model: Flamingo, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    family = family_io(model)
    return [family.tokenize(model, t, add_special_tokens) for t in texts]


def _check_length(model: Flamingo, total: int, max_new_tokens: int) -> None:
    limit = context_length(model)
    if limit is not None and total + max_new_tokens > limit:
        raise PromptError(f"the prompt has {total} tokens and {max_new_tokens} new tokens are asked for, "
                          f"{total + max_new_tokens} in all, but the language model's context is {limit} tokens")


def _check_media(model: Flamingo, prompts: Sequence[Prompt]) -> None:
    token = model.config.media_token
    for i, p in enumerate(prompts):
        if p.text.count(token) != len(p.media):
            raise PromptError(f"prompt {i}: {p.text.count(token)} {token} placeholder(s) but {len(p.media)} image(s)")


@torch.no_grad()
def encode_prompts(model: Flamingo, prompts: Sequence[Prompt], *, max_new_tokens: int = 0,
                   add_special_tokens: bool = True) -> FlamingoState:
    """Run a batch of prompts (left-padded) once and return the state after them."""
    if not prompts:
        raise PromptError("no prompt given")
    _check_media(model, prompts)
    rows = _tokenize(model, [p.text for p in prompts], add_special_tokens)
    _check_length(model, max(len(r) for r in rows), max_new_tokens)
    encoded = encode_media_of(model, prompts)
    return encode_ids(model, rows, encoded.visual_tokens, encoded.num_media, encoded.key_mask)


@torch.no_grad()
def encode_ids(model: Flamingo, rows: Sequence[Sequence[int]], visual_tokens: torch.Tensor,
               num_media: torch.Tensor, key_mask: torch.Tensor | None = None) -> FlamingoState:
    """`encode_prompts` for prompts already tokenized (one id list each, an `<image>` token per
    image) whose media are already encoded (`MediaFamily.encode`: visual tokens [B, N, R, D],
    counts [B], key mask [B, N, R] or None). The caller has checked the placeholders and the
    context length (the serving engine does at its door).

    Where a token with no image before it sees every visual token of its row
    (`zero_attention_without_media` off: Llama 3.2 Vision's text before its first image), it
    would also see the zero tokens of padding slots: prompts with different media counts are
    then run in separate passes, each without padding slots (and the states concatenated)."""
    counts = [int(n) for n in num_media]
    if model.config.cross_attention.zero_attention_without_media or len(set(counts)) < 2:
        return _encode_ids(model, rows, visual_tokens, num_media, key_mask)
    groups: dict[int, list[int]] = {}
    for row, count in enumerate(counts):
        groups.setdefault(count, []).append(row)
    states, order = [], []
    for count, members in groups.items():
        index = torch.tensor(members, device=visual_tokens.device)
        states.append(_encode_ids(model, [rows[i] for i in members], visual_tokens[index, :count], num_media[index],
                                  None if key_mask is None else key_mask[index, :count]))
        order += members
    state = FlamingoState.concat(states)
    back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=state.attention_mask.device)
    return state.select_rows(back)


def _encode_ids(model: Flamingo, rows: Sequence[Sequence[int]], visual_tokens: torch.Tensor,
                num_media: torch.Tensor, key_mask: torch.Tensor | None) -> FlamingoState:
    ids, mask = _left_padded(model, rows)
    device = model.perceiver.latents.device
    ids, mask, kv = ids.to(device), mask.to(device), {}
    media, group_first, media_seen = media_context(model, ids, visual_tokens, num_media, kv, key_mask)
    out = model.logits_and_cache(ids, media, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return FlamingoState(out.past_key_values, mask, visual_tokens, num_media, out.logits[:, -1], kv, key_mask,
                         group_first, media_seen)


def encode_ids_and_prefix(model: Flamingo, ids: Sequence[int], visual_tokens: torch.Tensor,
                          num_media: torch.Tensor, cut: int) -> tuple[FlamingoState, FlamingoState]:
    """One prompt (`encode_ids` of one row) encoded in one forward pass, and the state after its
    first `cut` tokens taken from the same pass (its LM cache cut there, the images before it), for
    a prefix cache: a prefix that is not cached yet costs no pass of its own. Causal attention
    makes the first `cut` positions' keys and values those of the prefix alone. For models whose
    states carry no per-family masks (`prefix_from_one_pass`)."""
    full_ids, mask = _left_padded(model, [ids])
    device = model.perceiver.latents.device
    full_ids, mask, kv = full_ids.to(device), mask.to(device), {}
    media, _, _ = media_context(model, full_ids, visual_tokens, num_media, kv, None)
    out = model.logits_and_cache(full_ids, media, attention_mask=mask, use_cache=True,
                                 logits_to_keep=len(ids) - cut + 1)
    state = FlamingoState(out.past_key_values, mask, visual_tokens, num_media, out.logits[:, -1], kv)
    images = sum(1 for token in ids[:cut] if token == model.media_token_id)
    # Copies, so that the cached prefix does not keep the whole prompt's tensors alive.
    layers = [(keys[:, :, :cut].clone(), values[:, :, :cut].clone()) for keys, values, *_ in out.past_key_values]
    keys_width = images * visual_tokens.shape[2]  # the prefix's images' cross-attention keys/values
    prefix_kv = {layer: (k[:, :, :keys_width].clone(), v[:, :, :keys_width].clone()) for layer, (k, v) in kv.items()}
    prefix = FlamingoState(_cache_from_layers(out.past_key_values, layers), mask[:, :cut].clone(),
                           visual_tokens[:, :images].clone(), torch.full_like(num_media, images),
                           out.logits[:, 0].clone(), prefix_kv)
    return state, prefix


def _continued_key_values(model: Flamingo, contexts: Sequence[FlamingoState], sizes: Sequence[int],
                          keeps: Sequence[int], own_tokens: Sequence[torch.Tensor], slots: int
                          ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each cross-attention layer's keys/values for `extend_contexts_ids`' media rows (the images
    each context carries, then the query's own, padded to `slots`): the carried images' are taken
    from their context, where they were computed when it was encoded (a few-shot support set is
    projected once, not once per query), the queries' own are computed here. Keys and values are
    per visual token, so this equals projecting the whole rows."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    per_media = own_tokens[0].shape[2]
    own_visual = torch.cat(list(own_tokens)).flatten(1, 2)
    for layer, block in model.cross_attn_layers.items():
        own = [torch.split(part, list(sizes)) for part in block.attn.key_values(own_visual)]
        keys, values = [], []
        for i, (context, size, keep) in enumerate(zip(contexts, sizes, keeps)):
            context_media = int(context.num_media[0])
            if keep == 0:  # nothing carried
                carried = tuple(part[i][:1, :, :0] for part in own)
            elif layer in context.kv_cache:
                span = slice((context_media - keep) * per_media, context_media * per_media)
                carried = tuple(part[:1, :, span] for part in context.kv_cache[layer])
            else:  # the context kept no keys/values: project its images here
                tokens = context.visual_tokens[:1, context_media - keep:context_media].to(own_visual.dtype)
                carried = block.attn.key_values(tokens.flatten(1, 2))
            for part, own_part, out in zip(carried, own, (keys, values)):
                out.append(torch.cat([part.expand(size, -1, -1, -1), own_part[i]], dim=2))
        kv[layer] = (_cat_padded(keys, slots * per_media, dim=2), _cat_padded(values, slots * per_media, dim=2))
    return kv


def prefix_from_one_pass(model: Flamingo) -> bool:
    """Whether `encode_ids_and_prefix` applies: no token sees an image after it, the model's states
    carry no image group or no-image-after-EOS state (Llama 3.2 Vision and IDEFICS do), and every
    LM layer attends to all past tokens."""
    attention = model.config.cross_attention
    return (attention.zero_attention_without_media and not attention.no_media_after_eos
            and attention.media_attention in ("previous", "all_previous") and not has_windowed_attention(model))


def extend(model: Flamingo, context: FlamingoState, queries: Sequence[Prompt], *,
           max_new_tokens: int = 0) -> FlamingoState:
    """Continue one encoded context (e.g. the few-shot support examples) with each query.

    The context is not re-run: its LM cache is copied per query. Only the context images that
    text after them can still see are carried over (`Flamingo.media_seen_by_continuation`: under
    the paper's masking the last one).
    """
    if not queries:
        raise PromptError("no query given")
    return extend_contexts(model, [context], [queries], max_new_tokens=max_new_tokens)


@torch.no_grad()
def extend_contexts(model: Flamingo, contexts: Sequence[FlamingoState], queries: Sequence[Sequence[Prompt]], *,
                    max_new_tokens: int = 0) -> FlamingoState:
    """`extend` for several contexts at once, in one forward pass: each context (a batch-1 state,
    e.g. one few-shot task's support set, or a chat preamble) is continued with its own queries;
    the rows are the queries in order, context by context. Shorter contexts are left-padded
    (masked) to the longest."""
    if len(contexts) != len(queries) or not contexts or not all(queries):
        raise PromptError("expected one non-empty list of queries per context")
    for context in contexts:
        if context.batch_size != 1:
            raise PromptError(f"extend continues one context, got a state of batch size {context.batch_size}")
    flat = [query for group in queries for query in group]
    _check_media(model, flat)
    rows = _tokenize(model, [q.text for q in flat], add_special_tokens=False)
    _check_length(model, max(context.length for context in contexts) + max(map(len, rows)), max_new_tokens)
    encoded = encode_media_of(model, flat)
    return extend_contexts_ids(model, contexts, [len(group) for group in queries], rows, encoded.visual_tokens,
                               encoded.num_media, encoded.key_mask)


@torch.no_grad()
def extend_contexts_ids(model: Flamingo, contexts: Sequence[FlamingoState], sizes: Sequence[int],
                        rows: Sequence[Sequence[int]], visual_tokens: torch.Tensor,
                        num_media: torch.Tensor, key_mask: torch.Tensor | None = None) -> FlamingoState:
    """`extend_contexts` for queries already tokenized (`rows`, without special tokens; the first
    `sizes[0]` continue context 0, and so on) whose media are already encoded (`MediaFamily.encode`).
    The caller has checked the placeholders and the context length."""
    ids, query_mask = _left_padded(model, rows)
    device = contexts[0].attention_mask.device

    # Media rows: each context's images that its continuation can still see, then the query's own,
    # padded to the most slots (with their key masks, where the model has them).
    masked = key_mask is not None or any(context.key_mask is not None for context in contexts)
    carried, carried_masks, kept_media, firsts, seen = [], [], [], [], []
    for context, size in zip(contexts, sizes):
        context_media = int(context.num_media[0])
        keep = model.media_seen_by_continuation(context_media)
        carried.append(context.visual_tokens[:, context_media - keep:context_media].expand(size, -1, -1, -1))
        kept_mask = context.media_per_sequence()[3]
        carried_masks.append(kept_mask[:, context_media - keep:context_media].expand(size, -1, -1))
        kept_media.append(keep)
        if context.group_first is not None:  # the carried images are renumbered from 1
            firsts.append((context.group_first - (context_media - keep)).clamp(min=0).expand(size))
        if context.media_seen is not None:  # so is the image the query's first tokens see (0: none)
            seen.append((context.media_seen - (context_media - keep)).clamp(min=0).expand(size))
    dtype, query_tokens = carried[0].dtype, visual_tokens
    split_rows = torch.split(visual_tokens.to(dtype), list(sizes))
    groups = [torch.cat([kept, own], dim=1) for kept, own in zip(carried, split_rows)]
    slots = max(group.shape[1] for group in groups)
    visual_tokens = _cat_padded(groups, slots, dim=1)
    if masked:
        own_masks = torch.split(torch.ones(query_tokens.shape[:3], dtype=torch.bool, device=device)
                                if key_mask is None else key_mask.to(device), list(sizes))
        key_mask = _cat_padded([torch.cat([kept, own], dim=1) for kept, own in zip(carried_masks, own_masks)], slots,
                               dim=1)
    kv = _continued_key_values(model, contexts, sizes, kept_media, split_rows, slots)
    keep = torch.tensor(kept_media, device=device).repeat_interleave(torch.tensor(list(sizes), device=device))
    num_media = num_media + keep

    cache, context_mask = _concat_histories(contexts, repeats=sizes)  # each context's copied per query
    mask = torch.cat([context_mask, query_mask.to(device)], dim=1)
    ids = ids.to(device)
    media, group_first, media_seen = media_context(model, ids, visual_tokens, num_media, kv, key_mask, keep,
                                                   torch.cat(firsts) if firsts else None,
                                                   torch.cat(seen) if seen else None)
    out = model.logits_and_cache(ids, media, attention_mask=mask, past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
    return FlamingoState(out.past_key_values, mask, visual_tokens, num_media, out.logits[:, -1], kv, key_mask,
                         group_first, media_seen)
