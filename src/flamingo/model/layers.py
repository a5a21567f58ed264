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
    raise ValueError(f"activation: expected 'sqrelu' or 'gelu', got {name!r}")


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear(dim, mult*dim) -> activation -> Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=bias)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(dim * mult, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))
