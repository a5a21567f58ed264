"""IDEFICS (transformers' `IdeficsForVisionText2Text`, HuggingFaceM4/idefics-9b, -80b and their
-instruct variants) as configuration of our model.

IDEFICS is the open reproduction of Flamingo: a frozen LLaMA with a GATED XATTN-DENSE block in
front of every `cross_layer_interval`-th block (from the first), a Perceiver Resampler over a
frozen CLIP tower (or the CLIP tokens themselves), two or three decoupled extra vocabulary rows
in the embedding *and* the output head. Its layer is ours with switches: RMSNorm pre-norms,
RMSNorm q/k norms, a SwiGLU feed-forward, float or vector tanh gates; transformers' own CLIP
tower (`IdeficsVisionTransformer`) is reused as a frozen component.

Mapping (theirs, as `IdeficsForVisionText2Text.state_dict()` names it -> ours):

| IDEFICS | ours |
|---|---|
| `model.layers.{i}`, `norm`, `embed_tokens.weight`, `lm_head.weight` | frozen `LlamaForCausalLM` (same blocks) |
| `gated_cross_attn_layers.{k}` | GATED XATTN-DENSE in front of LM block k * interval (`every`, `first_layer: 0`) |
| `input_layernorm`, `post_attention_layernorm` (RMSNorm) | `attn.norm`, `ffw.norm` (`norm: rmsnorm`) |
| `cross_attn.q_proj`, `[k_proj; v_proj]`, `o_proj` | `attn.to_q`, `attn.to_kv` (stacked), `attn.to_out` |
| `cross_attn.q_layer_norm`, `k_layer_norm` (RMSNorm) | `attn.q_norm`, `attn.k_norm` (`qk_norm: true`) |
| `alpha_cross_attn`, `alpha_dense` ([1] or [1, 1, D]) | `attn_gate`, `ffw_gate` (`gate: scalar` or `vector`) |
| `mlp.gate_proj`, `up_proj`, `down_proj` | `ffw.fc1`, `ffw.fc_up`, `ffw.fc2` (`ffw: swiglu`, `activation: silu`) |
| `cross_attention_gate` (no image: attention output 0, MLP kept) | `zero_attention_without_media: true` (the paper's) |
| `image_attention_mask`: the last image at or before a token | `media_attention: previous` (the paper's) |
| ... and no image after an end-of-sequence token until the next image | `no_media_after_eos: true` (packed documents) |
| `embed_tokens.additional_embedding` | `new_token_embeddings.new_rows` (`extra_token_rows`) |
| `lm_head.additional_fc` | `new_token_logits.new_rows` (`extra_token_head: true`) |
| `perceiver_resampler.*` | `perceiver.*` (`activation: relu`, `qk_norm` LayerNorm, no temporal embeddings) |
| no resampler (`use_resampler: false`) | `perceiver.kind: identity` (the CLIP tokens are the visual tokens) |
| `vision_model.*` | `IdeficsVisionTower` (transformers' `IdeficsVisionTransformer`, frozen; last hidden state) |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import re

import torch

from flamingo.errors import CheckpointError, UserError
from flamingo.model.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LanguageModelConfig,
    PerceiverConfig,
    UnfreezeConfig,
    VisionConfig,
)
from flamingo.model.families.checkpoint import load_strictly, read_tensors
from flamingo.model.families.interface import MEDIA, ChatMessage, EncodedMedia
from flamingo.model.flamingo import Flamingo, FlamingoOutput
from flamingo.model.vision import VisionEncoder

FAMILY = "idefics"
MEDIA_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"  # around every run of images, as IdeficsProcessor writes them
END_OF_UTTERANCE = "<end_of_utterance>"  # the -instruct models' end of turn
ROLES = {"user": "User:", "assistant": "Assistant:"}  # the -instruct chat format (its model card)


class IdeficsPixels:
    """IDEFICS's image preprocessing (transformers' image processor: the image resized to a square,
    no padding) behind our `ImageProcessor`'s interface, for the code that preprocesses through
    `vision_encoder.image_processor()` (training data, retrieval, the generic inference path)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def preprocess_image(self, image: Any) -> torch.Tensor:
        return self.image_processor([image.convert("RGB")], return_tensors="pt")[0]

    def preprocess_video(self, frames: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.preprocess_image(frame) for frame in frames])

    def __call__(self, images: Any) -> torch.Tensor:
        return self.preprocess_video(images) if isinstance(images, (list, tuple)) else self.preprocess_image(images)


class IdeficsVisionTower(VisionEncoder):
    """transformers' `IdeficsVisionTransformer` (CLIP ViT), frozen: images [K, 3, H, W] -> its
    last hidden state [K, 1 + patches, D] (the class token included, no final LayerNorm), which
    IDEFICS feeds its resampler or its cross-attention layers. `pixels`: its image preprocessing
    (the checkpoint's own image processor once loaded)."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        from transformers import IdeficsImageProcessorPil

        config = model.config
        super().__init__(feature_dim=config.embed_dim, image_size=config.image_size, mean=tuple(mean),
                         std=tuple(std))
        self.model = model
        self.tokens_per_image = (config.image_size // config.patch_size) ** 2 + 1
        self.pixels = IdeficsPixels(IdeficsImageProcessorPil(image_size=config.image_size, image_mean=list(mean),
                                                             image_std=list(std)))
        self._freeze()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels.to(self._param_dtype())).last_hidden_state

    def image_processor(self) -> IdeficsPixels:  # type: ignore[override]
        return self.pixels


def llama_config(hf_config: Any) -> Any:
    """The LLaMA inside an `IdeficsConfig`: its self-attention blocks, embedding table and head."""
    from transformers import LlamaConfig

    c = hf_config
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, attention_bias=False, mlp_bias=False)


def _check_supported(hf_config: Any) -> None:
    """Refuse, naming the field, an IDEFICS layout this mapping does not express."""
    c = hf_config
    problems = []
    if c.hidden_act != "silu":
        problems.append(f"hidden_act {c.hidden_act!r} (supported: 'silu')")
    if c.alpha_type not in ("float", "vector"):
        problems.append(f"alpha_type {c.alpha_type!r} (supported: 'float', 'vector')")
    if c.cross_layer_interval < 1 or c.num_hidden_layers % c.cross_layer_interval:
        problems.append(f"cross_layer_interval {c.cross_layer_interval} does not divide num_hidden_layers "
                        f"{c.num_hidden_layers} (IdeficsModel would index a cross-attention block it lacks)")
    if c.additional_vocab_size < 1:
        problems.append("additional_vocab_size 0 (the <image> token needs its extra row)")
    if c.tie_word_embeddings:
        problems.append("tie_word_embeddings true (the published checkpoints untie them)")
    if c.hidden_size % c.num_attention_heads:
        problems.append(f"hidden_size {c.hidden_size} is not a multiple of num_attention_heads {c.num_attention_heads}")
    if problems:
        raise CheckpointError("IDEFICS config: " + "; ".join(problems))


def flamingo_config(hf_config: Any, end_of_chunk_token: str, source: str = "") -> FlamingoConfig:
    """Our configuration of the IDEFICS described by `hf_config` (an `IdeficsConfig`);
    end_of_chunk_token: what ends a turn or an example (`chunk_token`)."""
    _check_supported(hf_config)
    c, v, p = hf_config, hf_config.vision_config, hf_config.perceiver_config
    if c.use_resampler:
        perceiver = PerceiverConfig(kind="resampler", depth=p.resampler_depth, num_latents=p.resampler_n_latents,
                                    heads=p.resampler_n_heads, head_dim=p.resampler_head_dim, ffw_mult=4,
                                    max_frames=0, activation="relu", qk_norm=bool(p.qk_layer_norms_perceiver))
    else:
        perceiver = PerceiverConfig(kind="identity", num_latents=(v.image_size // v.patch_size) ** 2 + 1, max_frames=0)
    heads = c.num_attention_heads
    return FlamingoConfig(
        vision=VisionConfig(kind="features", name_or_path=source, feature_dim=v.embed_dim),
        lm=LanguageModelConfig(name_or_path=source),
        perceiver=perceiver,
        cross_attention=CrossAttentionConfig(
            every=c.cross_layer_interval, first_layer=0, heads=heads, head_dim=c.hidden_size // heads,
            norm="rmsnorm", norm_eps=float(c.rms_norm_eps), qk_norm=bool(c.qk_layer_norms), ffw="swiglu",
            ffw_dim=c.intermediate_size, media_attention="previous", zero_attention_without_media=True,
            gate="vector" if c.alpha_type == "vector" else "scalar", no_media_after_eos=True),
        activation="silu", bias=False, media_token=MEDIA_TOKEN, end_of_chunk_token=end_of_chunk_token,
        extra_token_rows=c.additional_vocab_size, extra_token_head=True)


def chunk_token(hf_config: Any, tokenizer: Any) -> str:
    """What ends a turn: `<end_of_utterance>` where the tokenizer has it within the model's rows
    (the -instruct models), else the end-of-sequence token."""
    rows = hf_config.vocab_size + hf_config.additional_vocab_size
    if END_OF_UTTERANCE in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE) < rows:
        return END_OF_UTTERANCE
    if tokenizer.eos_token is None:
        raise CheckpointError("IDEFICS tokenizer: no end-of-sequence token")
    return tokenizer.eos_token


def build_model(hf_config: Any, tokenizer: Any, source: str = "", mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, unfreeze: UnfreezeConfig | None = None) -> Flamingo:
    """Our model for `hf_config` with random weights (load them with `load_state_dict`): the frozen
    LLaMA, transformers' IDEFICS CLIP tower (frozen) and the bridge. mean/std: the image
    processor's normalisation (default: IDEFICS's, CLIP's). unfreeze: backbone parts trained with
    the bridge (fine-tuning)."""
    from transformers import LlamaForCausalLM
    from transformers.models.idefics.image_processing_idefics import IDEFICS_STANDARD_MEAN, IDEFICS_STANDARD_STD
    from transformers.models.idefics.vision import IdeficsVisionTransformer

    for token in (MEDIA_TOKEN, FAKE_TOKEN):
        if token not in tokenizer.get_vocab():
            raise CheckpointError(f"IDEFICS tokenizer: no {token!r} token")
    config = flamingo_config(hf_config, chunk_token(hf_config, tokenizer), source)
    config.unfreeze = unfreeze or config.unfreeze
    vision_config = hf_config.vision_config
    vision_config._attn_implementation = hf_config._attn_implementation or "sdpa"
    tower = IdeficsVisionTower(IdeficsVisionTransformer(vision_config), mean or IDEFICS_STANDARD_MEAN,
                               std or IDEFICS_STANDARD_STD)
    model = Flamingo(config, LlamaForCausalLM(llama_config(hf_config)), tokenizer, vision_encoder=tower)
    model.family = FAMILY
    model.fake_token_id = tokenizer.convert_tokens_to_ids(FAKE_TOKEN)
    return model


# ------------------------------------------------------------------------------ the state dict
_XATTN_NAMES = {
    "input_layernorm.weight": "attn.norm.weight",
    "cross_attn.q_proj.weight": "attn.to_q.weight",
    "cross_attn.o_proj.weight": "attn.to_out.weight",
    "cross_attn.q_layer_norm.weight": "attn.q_norm.weight",
    "cross_attn.k_layer_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ffw.norm.weight",
    "mlp.gate_proj.weight": "ffw.fc1.weight",
    "mlp.up_proj.weight": "ffw.fc_up.weight",
    "mlp.down_proj.weight": "ffw.fc2.weight",
}
_XATTN_KV = ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight")
_GATES = {"alpha_cross_attn": "attn_gate", "alpha_dense": "ffw_gate"}
_RESAMPLER_NAMES = {  # blocks.{i}.0 (attention) / .1 (MLP) -> layers.{i}.attn / .ffw
    "0.context_layer_norm": "attn.norm_media", "0.latents_layer_norm": "attn.norm_latents", "0.q_proj": "attn.to_q",
    "0.output_proj": "attn.to_out", "0.q_layer_norm": "attn.q_norm", "0.k_layer_norm": "attn.k_norm",
    "1.ln": "ffw.norm", "1.fc": "ffw.fc1", "1.c_proj": "ffw.fc2",
}
_RESAMPLER_KV = ("0.k_proj.weight", "0.v_proj.weight")
_TOP_NAMES = {
    "model.embed_tokens.weight": "lm.model.embed_tokens.base.weight",
    "model.embed_tokens.additional_embedding.weight": "lm.model.embed_tokens.new_rows",
    "model.norm.weight": "lm.model.norm.weight",
    "lm_head.weight": "lm.lm_head.base.weight",
    "lm_head.additional_fc.weight": "lm.lm_head.new_rows",
    "model.perceiver_resampler.latents": "perceiver.latents",
    "model.perceiver_resampler.layer_norm.weight": "perceiver.norm.weight",
    "model.perceiver_resampler.layer_norm.bias": "perceiver.norm.bias",
}


def map_state_dict(hf_state: dict[str, torch.Tensor], model: Flamingo) -> dict[str, torch.Tensor]:
    """IDEFICS tensors -> ours, keyed by `model.state_dict()` names. Raises a CheckpointError
    naming every tensor it cannot place (a missing one is named by `load_state_dict`)."""
    decoder = f"lm.{model.decoder_layers_path}"
    crosses = sorted(model.cross_attn_layers)
    num_layers = len(model.lm.model.layers)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    pending: dict[str, dict[str, torch.Tensor]] = {}  # our to_kv name -> its k and v parts

    def block_index(rest: str, bound: int) -> tuple[int, str] | None:
        index, _, inner = rest.partition(".")
        return (int(index), inner) if index.isdigit() and int(index) < bound else None

    for key, tensor in hf_state.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = tensor
        elif key.startswith("model.vision_model."):
            out["vision_encoder.model." + key[len("model.vision_model."):]] = tensor
        elif key.startswith("model.layers.") and (found := block_index(key[len("model.layers."):], num_layers)):
            i, inner = found
            wrapped = "decoder_layer." if i in model.cross_attn_layers else ""
            out[f"{decoder}.{i}.{wrapped}{inner}"] = tensor
        elif (key.startswith("model.gated_cross_attn_layers.")
              and (found := block_index(key[len("model.gated_cross_attn_layers."):], len(crosses)))):
            k, inner = found
            prefix = f"{decoder}.{crosses[k]}.cross_attn."
            if inner in _XATTN_NAMES:
                out[prefix + _XATTN_NAMES[inner]] = tensor
            elif inner in _XATTN_KV:
                pending.setdefault(prefix + "attn.to_kv.weight", {})[inner] = tensor
            elif inner in _GATES:
                out[prefix + _GATES[inner]] = _gate(key, tensor, model)
            else:
                unknown.append(key)
        elif (key.startswith("model.perceiver_resampler.blocks.")
              and (found := block_index(key[len("model.perceiver_resampler.blocks."):], 1 << 30))):
            i, inner = found
            part, _, leaf = inner.rpartition(".")
            if part in _RESAMPLER_NAMES:
                out[f"perceiver.layers.{i}.{_RESAMPLER_NAMES[part]}.{leaf}"] = tensor
            elif inner in _RESAMPLER_KV:
                pending.setdefault(f"perceiver.layers.{i}.attn.to_kv.weight", {})[inner] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for name, parts in pending.items():
        if len(parts) == 2:  # keys then values, as our fused projection holds them
            out[name] = torch.cat([parts[k] for k in sorted(parts, key=lambda p: "v_proj" in p)])
        # a lone k_proj or v_proj leaves to_kv missing: named by load_state_dict
    if unknown:
        raise CheckpointError("IDEFICS checkpoint: tensors with no place in the model: "
                              + ", ".join(sorted(unknown)[:20])
                              + (f", ... ({len(unknown)} in all)" if len(unknown) > 20 else ""))
    return out


def _gate(key: str, tensor: torch.Tensor, model: Flamingo) -> torch.Tensor:
    """alpha_type float: [1] -> our scalar gate; vector: [1, 1, D] -> our [D] gate."""
    vector = model.config.cross_attention.gate == "vector"
    if (tensor.numel() != 1) if not vector else (tensor.shape[-1] != tensor.numel()):
        raise CheckpointError(f"{key}: expected {'a [1, 1, D] vector' if vector else 'one gate value'}, "
                              f"got shape {tuple(tensor.shape)}")
    return tensor.reshape(-1) if vector else tensor.reshape(())


def load_state_dict(model: Flamingo, hf_state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load IDEFICS weights into `model` strictly: every tensor of the model is set and every
    tensor of the checkpoint is used, or a CheckpointError names the difference."""
    load_strictly(model, map_state_dict(hf_state, model), source, "IDEFICS")


# ----------------------------------------------------------------------------------- running
@dataclass
class IdeficsOutput(FlamingoOutput):
    media_after: torch.Tensor | None = None  # [B] for the next call's `carried`


def encode_images(model: Flamingo, pixel_values: torch.Tensor, num_media: torch.Tensor | None = None) -> torch.Tensor:
    """The processor's pixel_values [B, N, 3, H, W] -> visual tokens [B, N, R, D] (the first
    num_media [B] slots of each row are real; the processor's padding images are not encoded)."""
    return model.encode_media(pixel_values[:, :, None], num_media=num_media)


def forward(model: Flamingo, input_ids: torch.Tensor, *, visual_tokens: torch.Tensor | None = None,
            num_media: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            media_offset: torch.Tensor | None = None, carried: torch.Tensor | None = None,
            past_key_values: Any = None, use_cache: bool = False, kv_cache: dict | None = None) -> IdeficsOutput:
    """`Flamingo.forward`'s steps over visual tokens encoded once (`encode_images`); in cached
    decoding (media_offset), carried [B] is what the previous call's `media_after` says the next
    token sees (none after an end-of-sequence token)."""
    media = model.media_context(input_ids, visual_tokens, num_media=num_media, media_offset=media_offset,
                                kv_cache=kv_cache, media_seen=carried)
    out = model.logits_and_cache(input_ids, media, attention_mask=attention_mask, past_key_values=past_key_values,
                                 use_cache=use_cache)
    return IdeficsOutput(logits=out.logits, past_key_values=out.past_key_values,
                         media_after=model.media_after(input_ids, media))


@torch.no_grad()
def greedy_generate(model: Flamingo, input_ids: torch.Tensor, *, visual_tokens: torch.Tensor | None = None,
                    num_media: torch.Tensor | None = None, max_new_tokens: int = 20
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the LM's KV cache and the cross-attention keys/values computed once
    (unpadded prompts): the new tokens [B, max_new_tokens] and the logits each was chosen from."""
    counts = (input_ids == model.media_token_id).sum(1) if num_media is None else num_media
    kv: dict = {}
    out = forward(model, input_ids, visual_tokens=visual_tokens, num_media=counts, use_cache=True, kv_cache=kv)
    tokens, logits = [], []
    for step in range(max_new_tokens):
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        if step + 1 < max_new_tokens:
            out = forward(model, tokens[-1], visual_tokens=visual_tokens, num_media=counts, media_offset=counts,
                          carried=out.media_after, past_key_values=out.past_key_values, use_cache=True,
                          kv_cache=kv)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


# ----------------------------------------------------------------------------------- loading
def load_checkpoint(directory: str | Path) -> Flamingo:
    """An IDEFICS directory as transformers saves it -> our model, every tensor placed
    (`load_state_dict`), in eval mode; its tokenizer and processor come from the directory."""
    from transformers import AutoTokenizer, IdeficsConfig

    directory = Path(directory)
    try:
        hf_config = IdeficsConfig.from_pretrained(str(directory))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{directory}: cannot read its IDEFICS config or tokenizer: "
                              f"{str(err).splitlines()[0][:300]}") from None
    model = build_model(hf_config, tokenizer, source=str(directory))
    load_state_dict(model, read_tensors(directory), source=str(directory))
    model.processor = read_processor(directory)
    if model.processor is not None:
        model.vision_encoder.pixels = IdeficsPixels(model.processor.image_processor)
    return model.eval()


def read_processor(directory: Path) -> Any:
    """The checkpoint's own `IdeficsProcessor`, None when the directory has no processor files."""
    from transformers import IdeficsProcessor

    if not (directory / "preprocessor_config.json").is_file() and not (directory / "processor_config.json").is_file():
        return None
    try:
        return IdeficsProcessor.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{directory}: cannot read its IDEFICS processor: "
                              f"{str(err).splitlines()[0][:300]}") from None


def build_shapes_only(hf_config: Any) -> Flamingo:
    """Our model of `hf_config` on the meta device (no weights, no memory): for parameter counts.
    No tokenizer is read; a placeholder holds the special tokens at IDEFICS's ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    v = hf_config.vocab_size
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, FAKE_TOKEN: v, MEDIA_TOKEN: v + 1}
    placeholder = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                          bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    with torch.device("meta"):
        return build_model(hf_config, placeholder)


# ----------------------------------------------------------------------------------- prompts
def _require_processor(model: Flamingo) -> Any:
    processor = getattr(model, "processor", None)
    if processor is None:
        raise UserError("this IDEFICS model was loaded without its processor (no preprocessor_config.json in the "
                        "checkpoint directory)")
    return processor


def _check_items(items: Sequence[Any], markers: bool = False) -> list[Any]:
    """Prompt items: text and PIL images (and `MEDIA` markers where `markers`)."""
    from PIL import Image

    for item in items:
        if isinstance(item, str):
            if MEDIA_TOKEN in item or FAKE_TOKEN in item:
                raise UserError(f"a text item contains {MEDIA_TOKEN!r} or {FAKE_TOKEN!r}; give the image itself "
                                f"where it goes")
        elif not isinstance(item, Image.Image) and not (markers and item is MEDIA):
            raise UserError(f"prompt item of type {type(item).__name__}: expected text or a PIL image")
    return list(items)


def prompt_inputs(model: Flamingo, items: Sequence[Any], **processor_kwargs: Any) -> Any:
    """An interleaved prompt (str text, PIL images in order) -> exactly what the checkpoint's
    `IdeficsProcessor` builds for it: BOS, `<fake_token_around_image><image><fake_token_around_image>`
    for an image (one fake token between consecutive images), input_ids, attention_mask,
    pixel_values [1, N, 3, H, W] and image_attention_mask."""
    processor = _require_processor(model)
    return processor(text=_check_items(items), return_tensors="pt", **processor_kwargs)


def chat_items(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """A chat -> the interleaved prompt of IDEFICS-instruct's format (its model card): each turn
    "User:" or "Assistant:" (after a newline but the first), its content, `<end_of_utterance>`;
    then "\\nAssistant:" for the answer; system messages (first) are written before the turns, each
    on its line. messages: {"role": "system", "user" or "assistant", "content": a str or a list of
    str and images (PIL images, or `MEDIA` markers), in order}. Adjacent texts are joined (the
    processor strips spaces at the ends of each text item)."""
    items: list[Any] = []

    def add(part: Any) -> None:
        if isinstance(part, str) and items and isinstance(items[-1], str):
            items[-1] += part
        else:
            items.append(part)

    turns = 0
    for message in messages:
        role, content = message.get("role"), message.get("content")
        parts = [content] if isinstance(content, str) else list(content or [])
        if role == "system" and turns == 0 and all(isinstance(part, str) for part in parts):
            add("".join(parts).strip() + "\n")
            continue
        if role not in ROLES:
            raise UserError(f"chat message role {role!r}: IDEFICS-instruct's format has {', '.join(ROLES)} "
                            f"(and text-only system messages first)")
        add(("\n" if turns else "") + ROLES[role] + (" " if parts and isinstance(parts[0], str) else ""))
        for part in _check_items(parts, markers=True):
            add(part)
        add(END_OF_UTTERANCE)
        turns += 1
    add("\n" + ROLES["assistant"])
    return items


def chat_inputs(model: Flamingo, messages: Sequence[dict[str, Any]]) -> Any:
    """A chat -> the inputs IdeficsProcessor builds for `chat_items` (its end-of-utterance tokens
    written by us, `add_end_of_utterance_token=False`), ready for the assistant's answer."""
    if model.config.end_of_chunk_token != END_OF_UTTERANCE:
        raise UserError(f"this IDEFICS checkpoint has no {END_OF_UTTERANCE!r} token (a base model): use plain prompts")
    return prompt_inputs(model, chat_items(messages), add_end_of_utterance_token=False)


def _media(model: Flamingo, inputs: Any) -> dict[str, Any]:
    counts = (inputs["input_ids"] == model.media_token_id).sum(1)
    if int(counts.sum()) == 0:
        return {}
    return dict(visual_tokens=encode_images(model, inputs["pixel_values"], counts), num_media=counts)


def generate_ids(model: Flamingo, items: Any, *, max_new_tokens: int = 20) -> tuple[list[int], str]:
    """Greedy continuation of an interleaved prompt (`prompt_inputs`; or of ready inputs,
    `chat_inputs`) up to the end-of-sequence or end-of-utterance token: (the new ids without it,
    "stop_token" or "length")."""
    inputs = items if hasattr(items, "keys") and "input_ids" in items else prompt_inputs(model, items)
    new, _ = greedy_generate(model, inputs["input_ids"], max_new_tokens=max_new_tokens, **_media(model, inputs))
    stops = {model.tokenizer.eos_token_id, model.eoc_token_id}
    ids = new[0].tolist()
    ends = [i for i, token in enumerate(ids) if token in stops]
    return (ids[:ends[0]], "stop_token") if ends else (ids, "length")


def stack_media(items: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images as `MEDIA_FAMILY.preprocess` gives them ([1, 3, H, W] each) -> pixel_values
    [N, 1, 3, H, W]; no other vision inputs."""
    return torch.stack(list(items)), {}


# ------------------------------------------------------------------ the generic code's interface
class IdeficsFamily:
    """`flamingo.model.families.interface.MediaFamily` for IDEFICS: prompt text tokenized as its
    processor writes it (BOS, fake tokens around each run of images), images through its image
    processor and our `encode_media`, chats in IDEFICS-instruct's format."""

    name = FAMILY
    chat_stop_strings: tuple[str, ...] = ()  # a turn ends with <end_of_utterance>, the end-of-chunk token

    def tokenize(self, model: Flamingo, text: str, add_special_tokens: bool) -> list[int]:
        """As `IdeficsProcessor`: `<fake_token_around_image>` before and after each image (one
        between consecutive images), and for a whole prompt BOS written before the text; no other
        special tokens."""
        def wrapped(run: re.Match) -> str:
            return FAKE_TOKEN + (MEDIA_TOKEN + FAKE_TOKEN) * (len(run.group()) // len(MEDIA_TOKEN))

        text = re.sub(f"(?:{re.escape(MEDIA_TOKEN)})+", wrapped, text)
        if add_special_tokens and model.tokenizer.bos_token is not None:
            text = model.tokenizer.bos_token + text
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def preprocess(self, model: Flamingo, frames: Sequence[Any]) -> torch.Tensor:
        """One image -> pixel_values [1, 3, H, W] from the checkpoint's image processor."""
        if len(frames) != 1:
            raise UserError(f"an IDEFICS model takes images, not videos (got {len(frames)} frames)")
        processor = getattr(model, "processor", None)
        pixels = IdeficsPixels(processor.image_processor) if processor is not None else \
            model.vision_encoder.image_processor()
        return pixels.preprocess_video(list(frames))

    def encode(self, model: Flamingo, media: Sequence[Sequence[torch.Tensor]], chunk: int | None = None
               ) -> EncodedMedia:
        """Per prompt its images' pixels -> visual tokens [B, N, R, D] (padding slots: zeros)."""
        device = model.perceiver.latents.device
        counts = torch.tensor([len(row) for row in media], device=device)
        slots, size = max([len(row) for row in media], default=0), model.vision_encoder.image_size
        pixels = torch.zeros(len(media), slots, 1, 3, size, size)
        for b, row in enumerate(media):
            for j, item in enumerate(row):
                pixels[b, j] = item
        with torch.no_grad():
            tokens = model.encode_media(pixels.to(device), num_media=counts)
        return EncodedMedia(tokens, counts)

    def chat_text(self, model: Flamingo, messages: Sequence[ChatMessage]) -> str:
        """IDEFICS-instruct's chat format (`chat_items`), with the media token where images go,
        each text stripped of spaces at its ends as the processor strips its text items."""
        if model.config.end_of_chunk_token != END_OF_UTTERANCE:
            raise UserError(f"this IDEFICS checkpoint has no {END_OF_UTTERANCE!r} token (a base model): use plain "
                            f"prompts")
        items = chat_items([{"role": m.role, "content": list(m.content)} for m in messages])
        return "".join(part.strip(" ") if isinstance(part, str) else MEDIA_TOKEN for part in items)


MEDIA_FAMILY = IdeficsFamily()
