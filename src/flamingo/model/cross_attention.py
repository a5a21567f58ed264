"""GATED XATTN-DENSE (paper Fig. 5, appendix A.1.2) and per-image attention masking (A.1.3).

Each layer runs in front of a frozen LM block:
    y = y + tanh(alpha_xattn) * xattn(q=y, kv=visual_tokens)
    y = y + tanh(alpha_dense) * ffw(y)
with alpha initialised to 0, so at initialisation the Flamingo model computes exactly what the
frozen LM computes.

Which visual tokens a text token may see is described by a `MediaContext` that
`Flamingo` builds once per call from the token ids and hands to the layers as a keyword argument
of the LM's forward (for decoder stacks that drop keyword arguments, it is set on the wrapper
layers for the duration of the call: `language_model.media_on_layers`). Nothing persists on the
layers between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.model.config import CrossAttentionConfig
from flamingo.model.layers import FeedForward, make_norm


def token_media_index(
    is_media: torch.Tensor,
    num_media: torch.Tensor,
    attend_next: torch.Tensor,
    media_offset: torch.Tensor,
) -> torch.Tensor:
    """phi(token): 1-based index of the image each token cross-attends to, 0 for none.

    is_media [B, L] marks `<image>` tokens; num_media [B] images per sample; attend_next [B]
    selects, per sample, the "next image" mode of A.3.2 instead of the paper's "last image
    before the token"; media_offset [B] counts images already consumed by earlier calls (cached
    decoding). An `<image>` token belongs to its own image in both modes.
    """
    seen = is_media.long().cumsum(dim=1)  # images at or before each token
    previous = media_offset[:, None] + seen
    upcoming = media_offset[:, None] + seen - is_media.long() + 1
    upcoming = torch.where(upcoming <= num_media[:, None], upcoming, torch.zeros_like(upcoming))
    return torch.where(attend_next[:, None], upcoming, previous)


def group_first_media(is_media: torch.Tensor, token_media: torch.Tensor,
                      earlier_first: torch.Tensor | None = None) -> torch.Tensor:
    """For "group" attention: [B, L] the first image (1-based) of the group each token sees, where
    images with no text between them form one group (Llama 3.2 Vision's processor). A token whose
    group began in an earlier call (cached decoding) sees from earlier_first [B] (that call's last
    answer) on, or its last image only when that is not given."""
    follows_media = F.pad(is_media[:, :-1], (1, 0), value=False)
    starts = torch.where(is_media & ~follows_media, token_media, torch.zeros_like(token_media))
    first = starts.cummax(dim=1).values
    before = token_media if earlier_first is None else earlier_first[:, None].expand_as(token_media)
    return torch.where(first > 0, first, before)


def no_media_after_eos(input_ids: torch.Tensor, is_media: torch.Tensor, token_media: torch.Tensor, eos_token_id: int,
                       media_seen: torch.Tensor | None = None) -> torch.Tensor:
    """`token_media` [B, L] with no image for the tokens after an end-of-sequence token and before
    the next image (IDEFICS's packed documents; the end-of-sequence token itself still sees its
    image). media_seen [B]: what a token of this call before its first image sees, as an earlier
    call (cached decoding) left it (`media_after`); default: token_media's choice."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if media_seen is not None:
        before_first = is_media.long().cumsum(1) == 0
        token_media = torch.where(before_first, media_seen.to(token_media)[:, None], token_media)
    last_media = torch.where(is_media, positions, -1).cummax(1).values
    eos = torch.where(input_ids == eos_token_id, positions, -1)
    last_eos_before = F.pad(eos[:, :-1], (1, 0), value=-1).cummax(1).values
    return torch.where(last_eos_before > last_media, 0, token_media)


@dataclass
class MediaContext:
    """Everything the cross-attention layers need for one forward call.

    visual_tokens: [B_media, M*R, D] resampled tokens of M (padded) media per row, R tokens each;
        B_media divides the batch B, and consecutive groups of B / B_media rows share a row.
    token_media: [B, L] phi(token) for the tokens of this call (see `token_media_index`).
    attend_all_previous: [B] whether a sample sees all images up to phi (ablation) rather than
        image phi only.
    kv_cache: when not None, keys/values of each layer are computed once and kept here, keyed by
        layer index, for reuse by later calls over the same visual tokens.
    token_first_media: [B, L] when set, a token sees images token_first_media..token_media
        (1-based; "group" attention) instead of what attend_all_previous says.
    key_mask: [B_media, M*R] when set, False marks visual tokens no token with an image may see
        (padding tiles of a tiled image); tokens without an image still see them all.
    """

    visual_tokens: torch.Tensor
    tokens_per_media: int
    token_media: torch.Tensor
    attend_all_previous: torch.Tensor
    kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    token_first_media: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def has_media(self) -> torch.Tensor:
        """[B, L] whether a token sees any image."""
        return self.token_media > 0

    @property
    def num_keys(self) -> int:
        return self.visual_tokens.shape[1]

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, L, M*R] boolean, True where a token may attend; built once, shared by layers.

        Tokens that see no image are allowed everything here (so softmax stays finite) and have
        their output zeroed by the layer.
        """
        if self._mask is None:
            key_media = torch.arange(self.num_keys, device=self.token_media.device) // self.tokens_per_media + 1
            phi = self.token_media[:, :, None]
            exact = phi == key_media
            up_to = (key_media <= phi) & (phi > 0)
            mask = torch.where(self.attend_all_previous[:, None, None], up_to, exact)
            if self.token_first_media is not None:
                mask = up_to & (key_media >= self.token_first_media[:, :, None])
            if self.key_mask is not None:
                rows = self.token_media.shape[0] // self.key_mask.shape[0]
                mask = mask & self.key_mask.repeat_interleave(rows, 0)[:, None, :]
            self._mask = (mask | ~self.has_media[:, :, None])[:, None]
        return self._mask

    def key_values(self, layer_idx: int, compute: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_cache is None:
            return compute(self.visual_tokens)
        if layer_idx not in self.kv_cache:
            self.kv_cache[layer_idx] = compute(self.visual_tokens)
        return self.kv_cache[layer_idx]


class MaskedCrossAttention(nn.Module):
    """Text queries attend to visual tokens under the per-image mask of a `MediaContext`."""

    def __init__(self, dim: int, visual_dim: int, heads: int, head_dim: int, bias: bool = False, *,
                 kv_heads: int | None = None, norm: str = "layernorm", norm_eps: float = 1e-5,
                 qk_norm: bool = False, zero_without_media: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.kv_heads = kv_heads or heads
        self.zero_without_media = zero_without_media
        inner = heads * head_dim
        self.norm = make_norm(norm, dim, norm_eps)
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(visual_dim, 2 * self.kv_heads * head_dim, bias=bias)  # fused: keys then values
        self.to_out = nn.Linear(inner, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def key_values(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K, D_visual] -> keys, values [B, kv_heads, K, head_dim]."""
        k, v = self.to_kv(visual_tokens).chunk(2, dim=-1)
        k = k.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor, has_media: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.norm(hidden)).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        rows, media_rows, length = q.shape[0], keys.shape[0], q.shape[2]
        share, group = rows // media_rows, self.heads // self.kv_heads
        if share > 1 or group > 1:
            # Consecutive rows that share one row of visual tokens (beams, candidate completions)
            # and the query heads that share one key/value head (grouped-query attention) are
            # folded into the query axis, [rows, heads, L] -> [media rows, kv heads, (share, group, L)],
            # so that keys/values are read once, never copied per row or head (decoding is bound
            # by reading them).
            q = q.unflatten(0, (media_rows, share)).unflatten(2, (self.kv_heads, group))
            q = q.permute(0, 2, 1, 3, 4, 5).flatten(2, 4)
            mask = mask.reshape(media_rows, 1, share, 1, length, -1).expand(-1, -1, -1, group, -1, -1)
            mask = mask.reshape(media_rows, 1, share * group * length, -1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        if share > 1 or group > 1:
            out = out.unflatten(2, (share, group, length)).permute(0, 2, 1, 3, 4, 5).flatten(0, 1).flatten(1, 2)
        if self.zero_without_media:
            out = out * has_media[:, None, :, None].to(out.dtype)  # no image before a token: exactly 0
        return self.to_out(out.transpose(1, 2).flatten(2))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, visual_dim: int, config: CrossAttentionConfig, activation: str,
                 bias: bool = False) -> None:
        super().__init__()
        self.skip_tokens_without_media = config.skip_tokens_without_media
        self.ffw_only_with_media = config.ffw_only_with_media
        self.attn = MaskedCrossAttention(dim, visual_dim, config.heads, config.head_dim, bias=bias,
                                         kv_heads=config.kv_heads, norm=config.norm, norm_eps=config.norm_eps,
                                         qk_norm=config.qk_norm,
                                         zero_without_media=config.zero_attention_without_media)
        gate_shape = (dim,) if config.gate == "vector" else ()
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ffw = FeedForward(dim, config.ffw_mult, activation, bias=bias, kind=config.ffw, hidden=config.ffw_dim,
                               norm=config.norm, norm_eps=config.norm_eps)
        self.ffw_gate = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, hidden: torch.Tensor, media: MediaContext, layer_idx: int) -> torch.Tensor:
        # The frozen LM may run in bf16 while the trainable layers keep fp32 weights.
        y = hidden.to(self.attn_gate.dtype)
        has_media = media.has_media
        if media.num_keys > 0:
            keys, values = media.key_values(layer_idx, self.attn.key_values)
            attended = self.attn(y, keys, values, media.attention_mask(), has_media)
            y = y + torch.tanh(self.attn_gate) * attended
        dense = self.ffw(y)
        if self.ffw_only_with_media:
            dense = dense * has_media[:, :, None].to(dense.dtype)
        y = y + torch.tanh(self.ffw_gate) * dense
        if self.skip_tokens_without_media:
            y = torch.where(has_media[:, :, None], y, hidden.to(y.dtype))
        return y.to(hidden.dtype)
