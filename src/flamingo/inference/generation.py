"""Greedy decoding with caches: the images are encoded once, the LM keeps its KV cache, and each
cross-attention layer computes the keys/values of the visual tokens once for the whole decode."""

from __future__ import annotations

import torch

from flamingo.model.flamingo import Flamingo


@torch.no_grad()
def greedy_generate(
    model: Flamingo,
    input_ids: torch.Tensor,
    *,
    pixel_values: torch.Tensor | None = None,
    vision_features: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    stop_token_ids: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Continue one prompt ([1, L] ids with its images) greedily; returns the new ids [1, n].

    Stops after `max_new_tokens` or at a stop token (default: `<|endofchunk|>` and EOS), which
    is included in the output.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt of shape [1, L], got {tuple(input_ids.shape)}")
    if stop_token_ids is None:
        eos = model.tokenizer.eos_token_id
        stop_token_ids = (model.eoc_token_id,) + ((eos,) if eos is not None else ())
    kv_cache: dict = {}
    out = model(input_ids, pixel_values=pixel_values, vision_features=vision_features,
                use_cache=True, kv_cache=kv_cache)
    visual_tokens, past = out.visual_tokens, out.past_key_values
    media_offset = (input_ids == model.media_token_id).sum(1)
    generated = []
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        generated.append(next_id)
        if int(next_id) in stop_token_ids:
            break
        out = model(next_id, visual_tokens=visual_tokens, media_offset=media_offset,
                    past_key_values=past, use_cache=True, kv_cache=kv_cache)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(generated, dim=1) if generated else input_ids.new_zeros(1, 0)
