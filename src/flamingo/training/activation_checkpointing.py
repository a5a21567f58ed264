"""Gradient (activation) checkpointing of the LM's decoder blocks.

Each block of the decoder stack (the `FlamingoDecoderLayer` wrappers, which run a GATED
XATTN-DENSE layer before the frozen LM block, and the plain blocks between them) keeps no
activations in the forward pass and is recomputed in the backward pass (`torch.utils.checkpoint`,
non-reentrant).

The cross-attention layers receive the media of a call as a keyword argument of the blocks, which
`checkpoint` keeps for the recomputation like any other. For LMs whose decoder stack drops keyword
arguments (`Flamingo.media_passing == "layers"`) the media are set on our wrapper layers only
while the LM's forward runs (`media_on_layers`); the recomputation happens later, in the backward
pass, where they are no longer set. The checkpointed forward of a wrapper layer therefore passes
the media it finds on the layer as the keyword argument, which the recomputation gets again, so
both passes compute exactly the same thing.

The wrapping replaces the blocks' `forward` on the instances, leaving the module tree, parameter
names and hooks (DDP, FSDP2) untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from flamingo.model.flamingo import Flamingo
from flamingo.model.language_model import MEDIA_ARGUMENT, FlamingoDecoderLayer, find_decoder_layers

_MARK = "_flamingo_checkpointed_forward"


def _checkpointed(layer: torch.nn.Module, original: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if isinstance(layer, FlamingoDecoderLayer) and layer.media is not None:
            kwargs.setdefault(MEDIA_ARGUMENT, layer.media)  # kept by checkpoint for the recomputation
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    return forward


def enable_gradient_checkpointing(model: Flamingo) -> int:
    """Checkpoint every block of the model's decoder stack; returns how many are (idempotent)."""
    _, layers = find_decoder_layers(model.lm, model.decoder_layers_path)
    for layer in layers:
        if _MARK not in layer.__dict__:
            original = layer.forward
            layer.forward = _checkpointed(layer, original)
            layer.__dict__[_MARK] = original
    return len(layers)
