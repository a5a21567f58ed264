"""Perceiver Resampler (paper Fig. 4, appendix A.1.1).

Maps a variable number of visual features per image or video ([T, S, D]: frames x spatial
positions x width) to a fixed number of visual tokens ([R, D]) with R learned latent queries.
Learned temporal embeddings are added per frame (no spatial embeddings: the features of a
convolutional/ViT encoder already carry position), frames and positions are flattened, and the
latents cross-attend to concat(features, latents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.model.config import PerceiverConfig
from flamingo.model.layers import FeedForward


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of media features and latents (keys and values)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=bias)  # fused: keys then values
        self.to_out = nn.Linear(inner, dim, bias=bias)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else None

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [K, N, D] (flattened frames x positions), latents [K, R, D] -> [K, R, D]."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every latent sees everything
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(self, config: PerceiverConfig, feature_dim: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.config = config
        dim = config.dim or feature_dim
        self.dim = dim
        # Only when the configured width differs from the encoder's: a linear map to the width.
        self.input_proj = nn.Linear(feature_dim, dim, bias=bias) if dim != feature_dim else None
        # Small initial latents and temporal embeddings (std 0.02, not 1 as in OpenFlamingo): large
        # ones are the same for every image and drown the image-dependent part of the visual
        # tokens (measured over EfficientNet features: 5% of their variation differs between
        # images at std 1, 60% at 0.02), leaving the zero-initialised gates no signal to open for.
        self.latents = nn.Parameter(0.02 * torch.randn(config.num_latents, dim))
        self.temporal_embeddings = (nn.Parameter(0.02 * torch.randn(config.max_frames, dim))
                                    if config.max_frames > 0 else None)
        self.layers = nn.ModuleList()
        for _ in range(config.depth):
            self.layers.append(nn.ModuleDict({
                "attn": PerceiverAttention(dim, config.heads, config.head_dim, bias=bias, qk_norm=config.qk_norm),
                "ffw": FeedForward(dim, config.ffw_mult, config.activation or activation, bias=bias),
            }))
        self.norm = nn.LayerNorm(dim)

    def temporal_embedding(self, num_frames: int) -> torch.Tensor:
        """[T, D] temporal embeddings; beyond the trained number of frames they are linearly
        interpolated (the paper trains on 8 frames and evaluates on 30)."""
        emb = self.temporal_embeddings
        assert emb is not None
        if num_frames <= emb.shape[0]:
            return emb[:num_frames]
        stretched = F.interpolate(emb.t().unsqueeze(0), size=num_frames, mode="linear", align_corners=True)
        return stretched.squeeze(0).t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [K, T, S, D_feature] (K images/videos) -> visual tokens [K, R, dim]."""
        if features.ndim != 4:
            raise ValueError(f"PerceiverResampler expects features [K, T, S, D], got shape {tuple(features.shape)}")
        if self.input_proj is not None:
            features = self.input_proj(features)
        num_media, num_frames = features.shape[:2]
        if self.temporal_embeddings is not None:
            features = features + self.temporal_embedding(num_frames)[:, None, :].to(features.dtype)
        media = features.flatten(1, 2)  # [K, T*S, D]
        latents = self.latents.to(media.dtype).expand(num_media, -1, -1)
        for layer in self.layers:
            latents = latents + layer["attn"](media, latents)
            latents = latents + layer["ffw"](latents)
        return self.norm(latents)


class LinearProjector(nn.Module):
    """No resampler (`perceiver.kind: linear`, Llama 3.2 Vision's multi-modal projector): every
    frame's feature vectors become visual tokens through one linear layer with bias,
    [K, T, S, D] -> [K, T*S, dim]."""

    def __init__(self, feature_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(feature_dim, dim, bias=True)

    @property
    def latents(self) -> torch.Tensor:
        """The parameter whose dtype and device the visual tokens take (the resampler's latents)."""
        return self.proj.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.flatten(1, 2))


class FeatureTokens(nn.Module):
    """No resampler and no projection (`perceiver.kind: identity`, IDEFICS without its
    resampler): every frame's feature vectors are the visual tokens, [K, T, S, D] -> [K, T*S, D]."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.dim = feature_dim
        # No parameters: this empty buffer carries the dtype and device the visual tokens take.
        self.register_buffer("latents", torch.zeros(0), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1, 2)
