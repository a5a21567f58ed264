"""Small building blocks shared by the Perceiver Resampler and the GATED XATTN-DENSE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SquaredReLU(nn.Module):
    """relu(x)^2, the activation of the paper's trainable layers (So et al., Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))


def make_activation(name: str) -> nn.Module:
    if name == "sqrelu":
        return SquaredReLU()
    if name == "gelu":
        return nn.GELU()  # exact erf form, as OpenFlamingo's nn.GELU()
    if name == "silu":
        return nn.SiLU()  # SwiGLU's (Llama 3.2 Vision)
    if name == "relu":
        return nn.ReLU()  # IDEFICS's resampler
    raise ValueError(f"activation: expected 'sqrelu', 'gelu', 'silu' or 'relu', got {name!r}")


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """"layernorm" (the paper's) or "rmsnorm" (Llama 3.2 Vision's)."""
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mult*dim) -> activation -> Linear(mult*dim, dim).

    kind "swiglu": fc2(activation(fc1(x)) * fc_up(x)) instead (fc1 is the gate projection);
    `hidden` overrides the width mult*dim; `norm` / `norm_eps` choose the pre-norm (`make_norm`).
    """

    def __init__(self, dim: int, mult: int, activation: str, bias: bool = False, *, kind: str = "mlp",
                 hidden: int | None = None, norm: str = "layernorm", norm_eps: float = 1e-5) -> None:
        super().__init__()
        hidden = hidden or dim * mult
        self.norm = make_norm(norm, dim, norm_eps)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc_up = nn.Linear(dim, hidden, bias=bias) if kind == "swiglu" else None
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.fc_up is not None:
            return self.fc2(self.act(self.fc1(x)) * self.fc_up(x))
        return self.fc2(self.act(self.fc1(x)))
