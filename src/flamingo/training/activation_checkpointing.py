"""Gradient (activation) checkpointing of the LM's decoder blocks.

Each block of the decoder stack (the `FlamingoDecoderLayer` wrappers, which run a GATED
XATTN-DENSE layer before the frozen LM block, and the plain blocks between them) keeps no
activations in the forward pass and is recomputed in the backward pass (`torch.utils.checkpoint`,
non-reentrant).

The cross-attention layers receive the media of a call as a keyword argument of the blocks, which
`checkpoint` keeps for the recomputation like any other. For LMs whose decoder stack drops keyword
arguments (`Flamingo.media_passing == "context"`) they come through a context variable
(`flamingo.model.cross_attention.media_context`) that is active only while `Flamingo.forward`
runs; the recomputation happens later, in the backward pass, where it is no longer set. The
checkpointed forward therefore captures the active `MediaContext` when it runs and re-enters it
around the recomputation, so both passes compute exactly the same thing.

The wrapping replaces the blocks' `forward` on the instances, leaving the module tree, parameter
names and hooks (DDP, FSDP2) untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from flamingo.model.cross_attention import active_media_context, media_context
from flamingo.model.flamingo import Flamingo
from flamingo.model.language_model import find_decoder_layers

_MARK = "_flamingo_checkpointed_forward"


def _checkpointed(original: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        media = active_media_context()

        def run(*a: Any, **k: Any) -> Any:
            if media is None:
                return original(*a, **k)
            with media_context(media):  # re-entered in the backward pass's recomputation
                return original(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def enable_gradient_checkpointing(model: Flamingo) -> int:
    """Checkpoint every block of the model's decoder stack; returns how many are (idempotent)."""
    _, layers = find_decoder_layers(model.lm, model.decoder_layers_path)
    for layer in layers:
        if _MARK not in layer.__dict__:
            original = layer.forward
            layer.forward = _checkpointed(original)
            layer.__dict__[_MARK] = original
    return len(layers)
