"""The Flamingo model (paper section 2): frozen vision encoder -> Perceiver Resampler -> GATED
XATTN-DENSE layers interleaved with a frozen causal LM.

Media travel with each call: `forward` takes the images (pixels or precomputed encoder features),
finds the `<image>` tokens in the ids, and derives for every token the image it may attend to.
Nothing is left on the model between calls. `forward` runs four public steps, which callers that
keep state between calls (cached decoding, `flamingo.inference`) run themselves: `encode_media`,
`media_context`, `logits_and_cache`, `training_nll`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.errors import UserError
from flamingo.model.config import ConfigError, FlamingoConfig
from flamingo.model.cross_attention import (
    GatedCrossAttentionBlock,
    MediaContext,
    group_first_media,
    no_media_after_eos,
    token_media_index,
)
from flamingo.model.fused_head_loss import DEFAULT_CHUNK, head_nll_sum
from flamingo.model.language_model import (
    MEDIA_ARGUMENT,
    DecoupledEmbedding,
    DecoupledLMHead,
    FlamingoDecoderLayer,
    add_special_tokens,
    find_decoder_layers,
    media_on_layers,
    forward_parameters,
    hidden_size,
    inspect_lm_forward,
)
from flamingo.model.perceiver import FeatureTokens, LinearProjector, PerceiverResampler


class FlamingoInputError(UserError):
    """Inputs that do not fit together (shapes, `<image>` tokens vs images)."""


IGNORE_INDEX = -100  # the label of a position without a target (cross_entropy's default ignore_index)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels [B, L] aligned with the inputs -> the target of each position: the next token's
    label (IGNORE_INDEX after the last). Shifting the labels rather than slicing the logits saves
    a copy of the [B, L, V] logits."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target in some row: the only logits the loss needs."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL of the labelled tokens (labels aligned with the inputs, -100 ignored),
    computed in fp32; `Flamingo.forward(labels=...)` returns the same sum divided by the count.
    With `positions`, `logits` hold only those positions (see `labelled_positions`)."""
    labels = labels.to(logits.device)
    if positions is None:
        targets = next_token_targets(labels)
    else:
        targets = labels[:, positions.to(logits.device) + 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


@dataclass
class FlamingoOutput:
    logits: torch.Tensor | None  # None with labels: the training loss never materialises them
    loss: torch.Tensor | None = None  # with labels: the mean next-token NLL of the labelled tokens
    nll_sum: torch.Tensor | None = None  # with labels: the same NLL summed (fp32), as the trainer weighs it
    past_key_values: Any = None
    visual_tokens: torch.Tensor | None = None  # [B, N, R, D], reusable by later calls


class Flamingo(nn.Module):
    """Flamingo over a frozen causal LM and a frozen vision encoder.

    Args:
        config: the architecture (the backbone specs in it are used by `build_flamingo`; here the
            backbones are given already built).
        lm: a Hugging Face causal LM; it is frozen and modified in place (layers inserted,
            embeddings decoupled).
        tokenizer: its tokenizer; the `<image>` and `<|endofchunk|>` tokens are added to it.
        vision_encoder: a `flamingo.model.vision.VisionEncoder` (pixels -> features), or None for
            a model fed with precomputed features.
        vision_feature_dim: the feature width when no vision encoder is given (default: the
            config's `vision.feature_dim`, with `vision.kind: features`).
    """

    def __init__(self, config: FlamingoConfig, lm: nn.Module, tokenizer: Any,
                 vision_encoder: nn.Module | None = None, vision_feature_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer

        if vision_encoder is not None:
            vision_feature_dim = vision_encoder.feature_dim
            vision_encoder.requires_grad_(False)
            vision_encoder.eval()
        elif config.vision.kind == "features":
            if vision_feature_dim not in (None, config.vision.feature_dim):
                raise ConfigError(f"vision_feature_dim={vision_feature_dim} but the config says "
                                  f"vision.feature_dim={config.vision.feature_dim}")
            vision_feature_dim = config.vision.feature_dim
        elif vision_feature_dim is None:
            raise ConfigError("Flamingo needs a vision_encoder or, for precomputed features, vision_feature_dim "
                              "(or a config with vision.kind: features)")
        self.vision_encoder = vision_encoder

        lm.requires_grad_(False)
        lm.eval()
        self.lm = lm
        self._lm_params = forward_parameters(lm)
        self._base_params = forward_parameters(lm.base_model)
        # The LM's cache keyword: `cache` in recent transformers, `past_key_values` before.
        self._cache_argument = "cache" if "cache" in self._lm_params else "past_key_values"

        self.decoder_layers_path, layers = find_decoder_layers(lm, config.lm.decoder_layers_path)
        cross_attn_indices = config.cross_attention_layers(len(layers))
        lm_forward = inspect_lm_forward(lm, layers[cross_attn_indices[0]])
        # How the media reach the cross-attention layers: as an argument of the LM's forward where
        # its decoder stack passes keyword arguments on to its blocks, else set on our layers.
        self.media_passing: Literal["argument", "layers"] = (
            "argument" if lm_forward.passes_layer_kwargs else "layers")
        # Training loss (`training_nll`) from the base model's last hidden state through a fused,
        # chunked head + NLL (fused_head_loss); otherwise from the LM's logits of the labelled
        # positions (an LM that post-processes its logits, or a head that is not a linear layer).
        self.fused_nll = (lm_forward.head_logits_unchanged and isinstance(lm.get_output_embeddings(), nn.Linear)
                          and config.extra_token_rows == 0)
        self.logit_postprocessing = lm_forward.postprocessing
        self.nll_chunk = DEFAULT_CHUNK

        if config.cross_attention.no_media_after_eos and tokenizer.eos_token_id is None:
            raise ConfigError("config field cross_attention.no_media_after_eos: the tokenizer has no "
                              "end-of-sequence token")
        # Special tokens, decoupled: only their embedding/output rows are trainable.
        self.eoc_token_id, self.media_token_id = add_special_tokens(
            tokenizer, [config.end_of_chunk_token, config.media_token])
        if config.extra_token_rows:
            self.tied_new_rows = self._extra_token_rows(config, lm)
        else:
            self.tied_new_rows = self._added_token_rows(config, lm)

        if config.perceiver.kind == "linear":
            self.perceiver = LinearProjector(vision_feature_dim, config.perceiver.dim or vision_feature_dim)
        elif config.perceiver.kind == "identity":
            self.perceiver = FeatureTokens(vision_feature_dim)
        else:
            self.perceiver = PerceiverResampler(config.perceiver, vision_feature_dim, config.activation, config.bias)

        lm_dim = hidden_size(lm)
        self.unfrozen_backbone = self._unfreeze(config, layers)
        self.cross_attn_layers: dict[int, GatedCrossAttentionBlock] = {}
        for idx in cross_attn_indices:
            block = GatedCrossAttentionBlock(lm_dim, self.perceiver.dim, config.cross_attention,
                                             config.activation, config.bias)
            layers[idx] = FlamingoDecoderLayer(layers[idx], block, idx)
            self.cross_attn_layers[idx] = block
        self._media_layers = [layers[idx] for idx in cross_attn_indices]  # a plain list: not registered twice

    def _extra_token_rows(self, config: FlamingoConfig, lm: nn.Module) -> bool:
        """`config.extra_token_rows` trainable input rows after the LM's table, for tokens the
        tokenizer already has; the output head stays the LM's (these tokens are never predicted),
        or with `config.extra_token_head` gets as many trainable output rows after its own."""
        table = lm.get_input_embeddings()
        first_new_id = table.weight.shape[0]
        for token, token_id in ((config.media_token, self.media_token_id), (config.end_of_chunk_token,
                                                                            self.eoc_token_id)):
            if not 0 <= token_id < first_new_id + config.extra_token_rows:
                raise ConfigError(f"token {token!r} has id {token_id}, outside the LM's {first_new_id} rows and the "
                                  f"{config.extra_token_rows} extra rows (extra_token_rows)")
        lm.set_input_embeddings(DecoupledEmbedding(table, first_new_id, config.extra_token_rows))
        if config.extra_token_head:
            head = lm.get_output_embeddings()
            if head.weight.shape[0] != first_new_id:
                raise ConfigError(f"extra_token_head: the LM's output head has {head.weight.shape[0]} rows but its "
                                  f"input table {first_new_id}; the extra rows would not line up")
            lm.set_output_embeddings(DecoupledLMHead(head, first_new_id, config.extra_token_rows))
        return False

    def _added_token_rows(self, config: FlamingoConfig, lm: nn.Module) -> bool:
        """Trainable input and output rows for the two added tokens (OpenFlamingo's layout);
        returns whether they are tied."""
        first_new_id = min(self.eoc_token_id, self.media_token_id)
        if sorted([self.eoc_token_id, self.media_token_id]) != [first_new_id, first_new_id + 1]:
            raise ConfigError(f"tokenizer ids of {config.end_of_chunk_token!r} and {config.media_token!r} must be "
                              f"consecutive, got {self.eoc_token_id} and {self.media_token_id}")
        input_embeddings, output_embeddings = lm.get_input_embeddings(), lm.get_output_embeddings()
        if first_new_id > input_embeddings.weight.shape[0]:
            raise ConfigError(f"the tokenizer has {first_new_id} tokens before {config.end_of_chunk_token!r} but the LM's "
                              f"embedding table has only {input_embeddings.weight.shape[0]} rows: they do not belong together")
        tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
        new_embeddings = DecoupledEmbedding(input_embeddings, first_new_id, 2)
        lm.set_input_embeddings(new_embeddings)
        lm.set_output_embeddings(DecoupledLMHead(output_embeddings, first_new_id, 2,
                                                 tied_rows=new_embeddings.new_rows if tied else None))
        return tied

    def _unfreeze(self, config: FlamingoConfig, layers: nn.ModuleList) -> dict[str, nn.Module]:
        """Make the backbone parts `config.unfreeze` names trainable; returns them by saved-weight
        prefix (vision_encoder, lm_blocks.<i>)."""
        chosen: dict[str, nn.Module] = {}
        if config.unfreeze.vision:
            if self.vision_encoder is None:
                raise ConfigError("config field unfreeze.vision: this model has no vision encoder (it is fed "
                                  "precomputed features), so there is none to train")
            chosen["vision_encoder"] = self.vision_encoder
        for idx in sorted(config.unfreeze.lm_blocks):
            if idx >= len(layers):
                raise ConfigError(f"config field unfreeze.lm_blocks: expected block indices < {len(layers)} "
                                  f"(the LM's number of blocks), got {idx}")
            chosen[f"lm_blocks.{idx}"] = layers[idx]
        for module in chosen.values():
            module.requires_grad_(True)
        return chosen

    # ------------------------------------------------------------------------ module plumbing
    @property
    def input_embeddings(self) -> DecoupledEmbedding:
        return self.lm.get_input_embeddings()

    @property
    def output_head(self) -> DecoupledLMHead:
        return self.lm.get_output_embeddings()

    def train(self, mode: bool = True) -> "Flamingo":
        """Frozen backbones stay in eval mode (no dropout), whatever the trainable parts do."""
        super().train(mode)
        self.lm.eval()
        if self.vision_encoder is not None:
            self.vision_encoder.eval()
        return self

    def fuse_for_inference(self) -> bool:
        """Rewrite the frozen vision encoder for faster inference (`VisionEncoder.fuse_for_inference`:
        same outputs up to float rounding; not for training or saving). Returns whether anything changed."""
        return self.vision_encoder is not None and self.vision_encoder.fuse_for_inference()

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The trained bridge, under LM-independent names (these prefix the saved weights), then
        the backbone parts unfrozen by `config.unfreeze` (vision_encoder, lm_blocks.<i>)."""
        modules: dict[str, nn.Module] = {"perceiver": self.perceiver}
        modules.update({f"cross_attn.{idx}": block for idx, block in self.cross_attn_layers.items()})
        modules["new_token_embeddings"] = self.input_embeddings
        if isinstance(self.output_head, DecoupledLMHead) and not self.tied_new_rows:
            modules["new_token_logits"] = self.output_head
        modules.update(self.unfrozen_backbone)
        return modules

    def unfrozen_backbone_names(self) -> set[str]:
        """Names (as in `trainable_state_dict`) of the unfrozen backbone parameters."""
        return {f"{prefix}.{name}" for prefix, module in self.unfrozen_backbone.items()
                for name, _ in module.named_parameters()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by saved name. LoRA adapters (flamingo.model.lora) are saved apart,
        in PEFT's format: their lora_* parameters are left out, and a layer they adapt keeps its own
        name (PEFT nests it as `base_layer`)."""
        return {f"{prefix}.{name.replace('.base_layer.', '.')}": param
                for prefix, module in self.trainable_modules().items()
                for name, param in module.named_parameters()
                if param.requires_grad and not any(part.startswith("lora_") for part in name.split("."))}

    # ----------------------------------------------------------------------------------- media
    def encode_media(self, pixel_values: torch.Tensor | None = None, *,
                     vision_features: torch.Tensor | None = None,
                     num_media: torch.Tensor | None = None) -> torch.Tensor:
        """Images/videos -> visual tokens [B, N, R, D].

        pixel_values [B, N, T, 3, H, W] or vision_features [B, N, T, S, D]; num_media [B] says how
        many of the N slots of each sample are real (the rest are padding: not encoded, zeros out).
        """
        source = pixel_values if pixel_values is not None else vision_features
        if source is None or (pixel_values is not None and vision_features is not None):
            raise FlamingoInputError("encode_media: give exactly one of pixel_values or vision_features")
        name, ndim, expected = (("pixel_values", 6, "[B, N, T, 3, H, W]") if pixel_values is not None
                                else ("vision_features", 5, "[B, N, T, S, D]"))
        if source.ndim != ndim:
            raise FlamingoInputError(f"{name}: expected shape {expected}, got {tuple(source.shape)}")
        batch, slots = source.shape[:2]
        real = self._real_media_mask(num_media, batch, slots, source.device)
        if not bool(real.any()):  # no media at all (e.g. a text-only batch): nothing to encode
            return torch.zeros(batch, slots, self.config.perceiver.num_latents, self.perceiver.dim,
                               dtype=self.perceiver.latents.dtype, device=source.device)
        chosen = source[real]  # [K, T, ...] only the real media, in sample order
        if pixel_values is not None:
            if self.vision_encoder is None:
                raise FlamingoInputError("pixel_values given but this model has no vision encoder; "
                                         "pass vision_features instead")
            # A frozen encoder keeps no activations for backward; an unfrozen one (fine-tuning) trains.
            with torch.set_grad_enabled(torch.is_grad_enabled() and "vision_encoder" in self.unfrozen_backbone):
                features = self.vision_encoder(chosen[:, None])[:, 0]
        else:
            features = chosen
        tokens = self.perceiver(features.to(self.perceiver.latents.dtype))
        out = tokens.new_zeros(batch, slots, *tokens.shape[1:])
        out[real] = tokens
        return out

    def encode_tiled_media(self, pixel_values: torch.Tensor, vision_inputs: dict[str, torch.Tensor], *,
                           num_media: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as tiles, for a vision encoder that takes each image's tile layout beside its
        pixels (`tile_features`; Llama 3.2 Vision's: vision_inputs aspect_ratio_ids [B, N] and
        aspect_ratio_mask [B, N, T]): pixel_values [B, N, T, 3, H, W] -> visual tokens [B, N, R, D]
        and their key mask [B, N, R] (False on padding tiles). With num_media [B] only the real slots
        are encoded (padding slots: zero tokens, masked); without, every slot, as transformers does."""
        if not hasattr(self.vision_encoder, "tile_features"):
            raise FlamingoInputError("vision_inputs given, but this model's vision encoder takes no tile layout")
        batch, slots = pixel_values.shape[:2]
        real = self._real_media_mask(num_media, batch, slots, pixel_values.device)
        dtype = self.perceiver.latents.dtype
        tokens = torch.zeros(batch, slots, self.config.perceiver.num_latents, self.perceiver.dim, dtype=dtype,
                             device=pixel_values.device)
        key_mask = torch.zeros(tokens.shape[:3], dtype=torch.bool, device=pixel_values.device)
        if not bool(real.any()):
            return tokens, key_mask
        with torch.set_grad_enabled(torch.is_grad_enabled() and "vision_encoder" in self.unfrozen_backbone):
            features, mask = self.vision_encoder.tile_features(pixel_values[real],
                                                               **{k: v[real] for k, v in vision_inputs.items()})
        encoded = self.perceiver(features[:, None].to(dtype))  # [K, R, D]
        if bool(real.all()):  # no copy into the zeros (the common case, and bit-equal to it)
            return encoded.unflatten(0, (batch, slots)), mask.unflatten(0, (batch, slots))
        tokens[real], key_mask[real] = encoded, mask
        return tokens, key_mask

    @staticmethod
    def _real_media_mask(num_media: torch.Tensor | None, batch: int, slots: int,
                         device: torch.device) -> torch.Tensor:
        if num_media is None:
            return torch.ones(batch, slots, dtype=torch.bool, device=device)
        num_media = torch.as_tensor(num_media, device=device)
        if num_media.shape != (batch,) or (num_media < 0).any() or (num_media > slots).any():
            raise FlamingoInputError(f"num_media: expected {batch} counts between 0 and {slots}, "
                                     f"got {num_media.tolist()}")
        return torch.arange(slots, device=device) < num_media[:, None]

    # --------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                vision_features: torch.Tensor | None = None, num_media: torch.Tensor | None = None,
                attend_next: torch.Tensor | None = None,
                vision_inputs: dict[str, torch.Tensor] | None = None) -> FlamingoOutput:
        """Run Flamingo on interleaved text and images: logits, or with `labels` the training loss.

        Args:
            input_ids [B, L] with one `<image>` token per image/video, in order.
            pixel_values [B, N, T, 3, H, W]: the media (T frames each; T = 1 for images). The j-th
                `<image>` of sample b is media [b, j]; text-only input gives none.
            attention_mask [B, L]: 1 for real tokens, 0 for padding.
            labels [B, L]: next-token targets aligned with the inputs (-100: none). `loss` is then
                their mean NLL and `nll_sum` their summed NLL (fp32), computed without the
                [B, L, vocabulary] logits (`training_nll`), and `logits` is None.
            vision_features [B, N, T, S, D]: instead of pixel_values, the frozen encoder's features
                (a model without a vision encoder).
            num_media [B]: real media per sample when samples have different counts (default: N).
            attend_next [B] bool: per-sample "next image" attention (A.3.2); default from config.
            vision_inputs: what a tiled vision encoder takes per image beside pixel_values (Llama 3.2
                Vision's tile layout: `encode_tiled_media`; T in pixel_values is then its tiles).

        Returns `FlamingoOutput`: logits [B, L, V] (without labels), loss and nll_sum (with labels),
        and visual_tokens [B, N, R, D] (the resampled media).

        Cached decoding and other multi-call uses run the same four steps this call runs, which
        are public: `encode_media` (media -> visual tokens), `media_context` (which visual tokens
        each token sees, keys/values kept across calls), `logits_and_cache` (the LM's forward,
        its cache, chosen logits) and `training_nll` (the summed NLL).
        """
        if input_ids.ndim != 2:
            raise FlamingoInputError(f"input_ids: expected shape [B, L], got {tuple(input_ids.shape)}")
        visual_tokens = key_mask = None
        if vision_inputs:
            if pixel_values is None:
                raise FlamingoInputError("vision_inputs given without pixel_values")
            visual_tokens, key_mask = self.encode_tiled_media(pixel_values, vision_inputs, num_media=num_media)
        elif pixel_values is not None and hasattr(self.vision_encoder, "tile_features"):
            raise FlamingoInputError("this model's vision encoder takes each image's tile layout beside its pixels: "
                                     "give vision_inputs (Llama 3.2 Vision: aspect_ratio_ids, aspect_ratio_mask)")
        elif pixel_values is not None or vision_features is not None:
            visual_tokens = self.encode_media(pixel_values, vision_features=vision_features, num_media=num_media)
        media = self.media_context(input_ids, visual_tokens, num_media=num_media, attend_next=attend_next,
                                   key_mask=key_mask)
        if labels is not None:
            nll = self.training_nll(input_ids, media, labels, attention_mask=attention_mask)
            count = (next_token_targets(labels.to(nll.device)) != IGNORE_INDEX).sum()
            return FlamingoOutput(logits=None, loss=nll / count, nll_sum=nll, visual_tokens=visual_tokens)
        out = self.logits_and_cache(input_ids, media, attention_mask=attention_mask)
        out.visual_tokens = visual_tokens
        return out

    # ------------------------------------------------------------------------ the steps of forward
    def media_context(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None = None, *,
                      num_media: torch.Tensor | None = None, attend_next: torch.Tensor | None = None,
                      media_offset: torch.Tensor | None = None,
                      kv_cache: dict | None = None, key_mask: torch.Tensor | None = None,
                      media_seen: torch.Tensor | None = None) -> MediaContext:
        """Which visual tokens each token of `input_ids` [B, L] sees: the `MediaContext` that
        `logits_and_cache` and `training_nll` hand to the cross-attention layers.

        Args:
            visual_tokens [B_media, N, R, D] (`encode_media`), or None for text only. B_media
                divides B: each run of B / B_media consecutive rows shares one row of media,
                without copies (beams, candidates).
            num_media [B_media]: real media per row (default: N).
            attend_next [B] bool: per-sample "next image" attention (A.3.2); default from config.
            media_offset [B]: images consumed by earlier calls whose LM cache this call continues
                (cached decoding): visual_tokens then hold all images so far, and the `<image>`
                tokens of input_ids are the ones after them. Without it, input_ids hold one
                `<image>` per real media item.
            kv_cache: a dict in which each layer keeps the keys/values of these visual tokens,
                computed once, for later calls over the same visual tokens.
            key_mask [B_media, N, R]: False for visual tokens that tokens with an image must not
                see (the padding tiles of Llama 3.2 Vision's tiled images).
            media_seen [B]: with `cross_attention.no_media_after_eos`, the image (1-based, 0: none)
                the tokens before this call's first image see, as the call it continues left it
                (`media_after`); default: the last image so far.
        """
        batch, device = input_ids.shape[0], input_ids.device
        if visual_tokens is None:
            visual_tokens = torch.zeros(batch, 0, self.config.perceiver.num_latents, self.perceiver.dim,
                                        dtype=self.perceiver.latents.dtype, device=device)
        media_rows = visual_tokens.shape[0] if visual_tokens.ndim == 4 else -1
        if media_rows < 1 or batch % media_rows:
            raise FlamingoInputError(f"media: expected a batch size dividing {batch} (the batch of input_ids), "
                                     f"got visual tokens of shape {tuple(visual_tokens.shape)}")
        slots = visual_tokens.shape[1]
        # Rows sharing one row of media (beams, candidates) see the same images.
        num_media = self._real_media_mask(num_media, media_rows, slots, device).sum(1)
        num_media = num_media.repeat_interleave(batch // media_rows)

        is_media = input_ids == self.media_token_id
        offset = (torch.zeros(batch, dtype=torch.long, device=device) if media_offset is None
                  else torch.as_tensor(media_offset, device=device).long())
        self._check_media_counts(is_media.sum(1), num_media, offset, exact=media_offset is None)
        if attend_next is None:
            attend_next = torch.full((batch,), self.config.cross_attention.media_attention == "next", device=device)
        context = MediaContext(
            visual_tokens=visual_tokens.flatten(1, 2),
            tokens_per_media=visual_tokens.shape[2],
            token_media=token_media_index(is_media, num_media, attend_next.to(device), offset),
            attend_all_previous=torch.full(
                (batch,), self.config.cross_attention.media_attention == "all_previous", device=device),
            kv_cache=kv_cache,
            key_mask=None if key_mask is None else key_mask.flatten(1, 2).to(device),
        )
        if self.config.cross_attention.media_attention == "group":
            context.token_first_media = group_first_media(is_media, context.token_media)
        if self.config.cross_attention.no_media_after_eos:
            context.token_media = no_media_after_eos(input_ids, is_media, context.token_media,
                                                     self.tokenizer.eos_token_id, media_seen)
        return context

    def media_after(self, input_ids: torch.Tensor, media: MediaContext) -> torch.Tensor:
        """[B] the image (1-based, 0: none) a token appended after `input_ids` sees, for a call that
        continues this one (`media_context`'s media_seen): the last token's, or none after an
        end-of-sequence token where `cross_attention.no_media_after_eos` says so."""
        last = media.token_media[:, -1]
        if self.config.cross_attention.no_media_after_eos:
            last = torch.where(input_ids[:, -1] == self.tokenizer.eos_token_id, 0, last)
        return last

    def media_seen_by_continuation(self, num_media: int) -> int:
        """How many of the last of `num_media` images text that continues after them can attend
        to under this model's masking: the last one (the paper's), all of them ("all_previous"),
        or none ("next": text looks ahead, so a cached context, whose text saw no later image,
        is not continued exactly in that training-time mode). A cached context is continued
        with only those (`inference.extend`); carrying more would be correct too, only wasteful."""
        mode = self.config.cross_attention.media_attention
        if mode == "previous":
            return min(num_media, 1)
        return 0 if mode == "next" else num_media

    def logits_and_cache(self, input_ids: torch.Tensor, media: MediaContext, *,
                         attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                         use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0) -> FlamingoOutput:
        """The LM's forward over `input_ids` with `media` (`media_context`): the logits (all of
        them; the last `logits_to_keep` if an int > 0; those positions if a 1-D tensor) and, with
        use_cache, the LM's cache, which a later call continues as `past_key_values` (with an
        attention_mask over everything so far, [B, past + L])."""
        kwargs = dict(self._lm_inputs(input_ids, attention_mask), use_cache=use_cache)
        if past_key_values is not None:
            kwargs[self._cache_argument] = past_key_values
        keep_some = isinstance(logits_to_keep, torch.Tensor) or logits_to_keep > 0
        if keep_some and "logits_to_keep" in self._lm_params:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self._run_with_media(self.lm, media, kwargs)
        logits = out.logits
        if keep_some and "logits_to_keep" not in self._lm_params:
            logits = logits[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else logits[:, logits_to_keep]
        cache = getattr(out, self._cache_argument, None)
        if isinstance(cache, tuple):  # transformers < 4.47 returns the legacy format unless given a Cache
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(cache)
        return FlamingoOutput(logits=logits, past_key_values=cache)

    def training_nll(self, input_ids: torch.Tensor, media: MediaContext, labels: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Summed next-token NLL (fp32) of `labels` [B, L] (aligned with input_ids, -100 ignored)
        under the LM's forward over `input_ids` with `media` (`media_context`).

        With `fused_nll`, the LM's base model gives the last hidden states and our head computes the
        NLL of the labelled tokens chunk by chunk together with its gradient, without [tokens,
        vocabulary] logits (`fused_head_loss.head_nll_sum`; frozen rows + trainable added rows).
        Otherwise the LM computes the logits of the labelled positions only, and the NLL follows.
        """
        inputs = self._lm_inputs(input_ids, attention_mask)
        labels = labels.to(input_ids.device)
        if not self.fused_nll:
            positions = labelled_positions(labels)
            kwargs = dict(inputs, use_cache=False)
            if "logits_to_keep" in self._lm_params:
                kwargs["logits_to_keep"] = positions
            logits = self._run_with_media(self.lm, media, kwargs).logits
            if "logits_to_keep" not in self._lm_params:
                logits = logits[:, positions]
            return token_nll_sum(logits, labels, positions)
        kwargs = {k: v for k, v in inputs.items() if k in self._base_params}
        if "use_cache" in self._base_params:
            kwargs["use_cache"] = False
        hidden = self._run_with_media(self.lm.base_model, media, kwargs)[0]
        targets = next_token_targets(labels).reshape(-1)
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        head = self.output_head
        return head_nll_sum(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), targets.index_select(0, keep),
                            head.base.weight, head.base.bias, head.new_rows, head.new_bias, head.first_new_id,
                            self.nll_chunk)

    def _lm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        inputs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask)
        if attention_mask is not None and "position_ids" in self._lm_params:
            # Positions count real tokens only, so left padding does not shift them.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = positions[:, -input_ids.shape[1]:]
        return inputs

    def _run_with_media(self, module: nn.Module, media: MediaContext, kwargs: dict[str, Any]) -> Any:
        """Call the LM (or its base model) with the media reaching our layers (`media_passing`)."""
        if self.media_passing == "argument":
            return module(**kwargs, **{MEDIA_ARGUMENT: media})
        with media_on_layers(self._media_layers, media):
            return module(**kwargs)

    @staticmethod
    def _check_media_counts(counts: torch.Tensor, num_media: torch.Tensor, offset: torch.Tensor,
                            exact: bool) -> None:
        bad = (counts != num_media) if exact else (offset + counts > num_media)
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            if exact:
                raise FlamingoInputError(
                    f"sample {b}: {int(counts[b])} <image> token(s) in the text but {int(num_media[b])} "
                    f"image(s) given; each image needs exactly one <image> token")
            raise FlamingoInputError(
                f"sample {b}: {int(offset[b])} image(s) already consumed + {int(counts[b])} new <image> "
                f"token(s) exceed the {int(num_media[b])} image(s) given")
