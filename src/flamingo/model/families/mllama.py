"""Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`) as configuration of our model.

Llama 3.2 Vision is a frozen Llama 3.1 text model with gated cross-attention blocks between its
self-attention blocks and a tiled ViT. Our model expresses it with switches of the GATED
XATTN-DENSE layer (`CrossAttentionConfig`), a linear projector instead of the Perceiver Resampler
and 8 decoupled extra vocabulary rows; transformers' own vision model is reused as a frozen component.

Mapping (theirs, as `MllamaForConditionalGeneration.state_dict()` names it -> ours):

| Llama 3.2 Vision | ours |
|---|---|
| self-attention block `layers.{i}` (i not in `cross_attention_layers`) | frozen `LlamaForCausalLM` block j = i - (cross blocks before i) |
| cross-attention block `layers.{c}` | GATED XATTN-DENSE `cross_attn.{j}` in front of LM block j (`cross_attention.layers`) |
| `input_layernorm` (RMSNorm) | `attn.norm` (`cross_attention.norm: rmsnorm`) |
| `cross_attn.q_proj`, `[k_proj; v_proj]`, `o_proj` | `attn.to_q`, `attn.to_kv` (stacked), `attn.to_out` (`kv_heads`: grouped-query) |
| `cross_attn.q_norm`, `k_norm` | `attn.q_norm`, `attn.k_norm` (`qk_norm: true`) |
| `cross_attn_attn_gate`, `cross_attn_mlp_gate` | `attn_gate`, `ffw_gate` (tanh-gated, as in the paper) |
| `post_attention_layernorm`, `mlp.gate_proj`, `up_proj`, `down_proj` | `ffw.norm`, `ffw.fc1`, `ffw.fc_up`, `ffw.fc2` (`ffw: swiglu`, `ffw_dim`, `activation: silu`) |
| `full_text_row_masked_out_mask` on the MLP | `ffw_only_with_media: true` |
| rows with no image attend to every vision token | `zero_attention_without_media: false` |
| consecutive `<|image|>` tokens form one group | `media_attention: group` |
| cross-attention mask over real tiles only | `MediaContext.key_mask` (padding tiles) |
| `embed_tokens` rows [0, V) / [V, V+8) | the LM's table / `new_token_embeddings.new_rows` (`extra_token_rows: 8`) |
| `norm`, `lm_head`, self-attention blocks | the frozen LM's (V logits: the extra tokens are never predicted) |
| `multi_modal_projector` | `perceiver.proj` (`perceiver.kind: linear`) |
| `vision_model.*` | `MllamaVisionTower` (transformers' `MllamaVisionModel`, frozen) |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flamingo.errors import CheckpointError, UserError
from flamingo.model.config import (
    CrossAttentionConfig,
    FlamingoConfig,
    LanguageModelConfig,
    PerceiverConfig,
    UnfreezeConfig,
    VisionConfig,
)
from flamingo.model.cross_attention import group_first_media
from flamingo.model.families.checkpoint import load_strictly, read_tensors
from flamingo.model.families.interface import MEDIA, ChatMessage, EncodedMedia
from flamingo.model.flamingo import Flamingo, FlamingoOutput

FAMILY = "mllama"
MEDIA_TOKEN = "<|image|>"
EXTRA_ROWS = 8  # MllamaTextModel's embed_tokens has vocab_size + 8 rows


class MllamaVisionTower(nn.Module):
    """transformers' `MllamaVisionModel`, frozen: tiled images -> [B, N, T*P, D] features (T tiles
    of P patch tokens, the class token included; D = vision_output_dim, the last hidden state and
    the intermediate layers concatenated)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feature_dim = model.config.vision_output_dim
        self.tokens_per_tile = model.num_patches
        self.max_tiles = model.config.max_num_tiles
        self.requires_grad_(False)
        self.eval()

    def fuse_for_inference(self) -> bool:
        return False

    def image_processor(self) -> Any:
        """The generic per-image preprocessing has no tiles or aspect ratios: refused (the inference
        and serving code preprocesses through `MLLAMA`, the checkpoint's own image processor)."""
        raise UserError("a Llama 3.2 Vision model takes its images through its own processor "
                        "(flamingo.model.families.mllama.MLLAMA.preprocess)")

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                         aspect_ratio_mask=aspect_ratio_mask).last_hidden_state  # [B, N, T, P, D]
        return out.flatten(2, 3)

    def tile_features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K images' tiles [K, T, 3, H, W], aspect-ratio ids [K] and tile masks [K, T] -> their
        features [K, T*P, D] and key mask [K, T*P] (False on padding tiles), for
        `Flamingo.encode_tiled_media`."""
        features = self(pixel_values[:, None], aspect_ratio_ids[:, None], aspect_ratio_mask[:, None])[:, 0]
        return features, aspect_ratio_mask.bool().repeat_interleave(self.tokens_per_tile, dim=-1)


def llama_config(text_config: Any) -> Any:
    """The Llama 3.1 text model inside a `MllamaTextConfig`: its self-attention blocks only."""
    from transformers import LlamaConfig

    t = text_config
    return LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers - len(t.cross_attention_layers),
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_parameters=dict(t.rope_parameters), tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        attention_bias=False, mlp_bias=False)


def lm_block_indices(cross_attention_layers: list[int], num_layers: int) -> list[int]:
    """Llama 3.2 Vision's cross-attention block indices (among all its blocks) -> the indices of
    the self-attention blocks they precede, which is where ours go."""
    crosses = sorted(cross_attention_layers)
    if crosses and crosses[-1] == num_layers - 1:
        raise CheckpointError(f"Llama 3.2 Vision config: a cross-attention block at the last index {crosses[-1]} "
                              f"follows no self-attention block; this layout is not supported")
    return [c - k for k, c in enumerate(crosses)]


def flamingo_config(hf_config: Any, source: str = "") -> FlamingoConfig:
    """Our configuration of the Llama 3.2 Vision described by `hf_config` (an `MllamaConfig`)."""
    t, v = hf_config.text_config, hf_config.vision_config
    heads = t.num_attention_heads
    tokens_per_media = v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)
    return FlamingoConfig(
        vision=VisionConfig(kind="features", name_or_path=source, feature_dim=v.vision_output_dim),
        lm=LanguageModelConfig(name_or_path=source),
        perceiver=PerceiverConfig(kind="linear", dim=t.hidden_size, num_latents=tokens_per_media, max_frames=0),
        cross_attention=CrossAttentionConfig(
            layers=lm_block_indices(t.cross_attention_layers, t.num_hidden_layers), heads=heads,
            head_dim=t.hidden_size // heads, kv_heads=t.num_key_value_heads, norm="rmsnorm",
            norm_eps=float(t.rms_norm_eps), qk_norm=True, ffw="swiglu", ffw_dim=t.intermediate_size,
            media_attention="group", zero_attention_without_media=False, ffw_only_with_media=True),
        activation="silu", bias=False, media_token=MEDIA_TOKEN, end_of_chunk_token="<|eot_id|>",
        extra_token_rows=EXTRA_ROWS)


def build_model(hf_config: Any, tokenizer: Any, source: str = "", unfreeze: UnfreezeConfig | None = None) -> Flamingo:
    """Our model for `hf_config` with random weights (load them with `load_state_dict`): a frozen
    Llama 3.1 LM, transformers' Mllama vision model (frozen) and the bridge. unfreeze: backbone
    parts trained with the bridge (fine-tuning)."""
    from transformers import LlamaForCausalLM, MllamaVisionModel

    if hf_config.text_config.hidden_act != "silu":
        raise CheckpointError(f"Llama 3.2 Vision config: hidden_act {hf_config.text_config.hidden_act!r} "
                              f"(supported: 'silu')")
    config = flamingo_config(hf_config, source)
    unfreeze = unfreeze or config.unfreeze
    # The tower is set after the model is built (it takes the tile layout): unfrozen here, not by Flamingo.
    config.unfreeze = UnfreezeConfig(vision=False, lm_blocks=list(unfreeze.lm_blocks))
    lm = LlamaForCausalLM(llama_config(hf_config.text_config))
    tower = MllamaVisionTower(MllamaVisionModel(hf_config.vision_config))
    model = Flamingo(config, lm, tokenizer, vision_feature_dim=tower.feature_dim)
    model.vision_encoder = tower  # frozen, called by `encode_images` (it needs the tile layout)
    config.unfreeze = unfreeze
    if unfreeze.vision:
        model.unfrozen_backbone["vision_encoder"] = tower.requires_grad_(True)
    model.family = FAMILY  # the inference API runs such a model through this module
    return model


# ------------------------------------------------------------------------------ the state dict
_PREFIXES = [  # transformers 4.x / Meta hub layout -> transformers 5 layout
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_model.", "model.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]

_XATTN_NAMES = {
    "input_layernorm.weight": "attn.norm.weight",
    "cross_attn.q_proj.weight": "attn.to_q.weight",
    "cross_attn.o_proj.weight": "attn.to_out.weight",
    "cross_attn.q_norm.weight": "attn.q_norm.weight",
    "cross_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ffw.norm.weight",
    "mlp.gate_proj.weight": "ffw.fc1.weight",
    "mlp.up_proj.weight": "ffw.fc_up.weight",
    "mlp.down_proj.weight": "ffw.fc2.weight",
}


def _normalise(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def map_state_dict(hf_state: dict[str, torch.Tensor], model: Flamingo) -> dict[str, torch.Tensor]:
    """Llama 3.2 Vision tensors -> ours, keyed by `model.state_dict()` names (`Flamingo`'s
    module tree). Raises a CheckpointError naming every tensor it cannot place."""
    text = "model.language_model."
    crosses = sorted(model.cross_attn_layers)
    hf_crosses = [j + k for k, j in enumerate(crosses)]
    lm_index = {}  # their block index -> our LM block index
    total = len(model.lm.model.layers) + len(crosses)
    j = 0
    for i in range(total):
        if i not in hf_crosses:
            lm_index[i] = j
            j += 1
    decoder = f"lm.{model.decoder_layers_path}"
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    pending_kv: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        name = _normalise(key)
        if name.startswith("model.vision_model."):
            out["vision_encoder.model." + name[len("model.vision_model."):]] = tensor
        elif name.startswith("model.multi_modal_projector."):
            out["perceiver.proj." + name[len("model.multi_modal_projector."):]] = tensor
        elif name == "lm_head.weight":
            out["lm.lm_head.weight"] = tensor
        elif name == text + "norm.weight":
            out["lm.model.norm.weight"] = tensor
        elif name == text + "embed_tokens.weight":
            vocab = model.input_embeddings.first_new_id
            if tensor.shape[0] != vocab + EXTRA_ROWS:
                raise CheckpointError(f"{key}: expected {vocab + EXTRA_ROWS} rows (vocab_size + {EXTRA_ROWS}), "
                                      f"got {tuple(tensor.shape)}")
            out["lm.model.embed_tokens.base.weight"] = tensor[:vocab]
            out["lm.model.embed_tokens.new_rows"] = tensor[vocab:]
        elif name.startswith(text + "layers."):
            index_text, _, rest = name[len(text + "layers."):].partition(".")
            if not index_text.isdigit() or int(index_text) >= total:
                unknown.append(key)
                continue
            i = int(index_text)
            if i in lm_index:
                out[f"{decoder}.{lm_index[i]}.{_inner(model, lm_index[i])}{rest}"] = tensor
                continue
            ours = crosses[hf_crosses.index(i)]
            prefix = f"{decoder}.{ours}.cross_attn."
            if rest in ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight"):
                pending_kv.setdefault(ours, {})[rest.split(".")[1]] = tensor
            elif rest in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if tensor.numel() != 1:
                    raise CheckpointError(f"{key}: expected one gate value, got shape {tuple(tensor.shape)}")
                out[prefix + ("attn_gate" if rest == "cross_attn_attn_gate" else "ffw_gate")] = tensor.reshape(())
            elif rest in _XATTN_NAMES:
                out[prefix + _XATTN_NAMES[rest]] = tensor
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for ours, kv in pending_kv.items():
        if set(kv) == {"k_proj", "v_proj"}:
            out[f"{decoder}.{ours}.cross_attn.attn.to_kv.weight"] = torch.cat([kv["k_proj"], kv["v_proj"]])
        # a lone k_proj or v_proj leaves to_kv missing: reported below
    if unknown:
        raise CheckpointError("Llama 3.2 Vision checkpoint: tensors with no place in the model: "
                              + ", ".join(sorted(unknown)[:20]) + (f", ... ({len(unknown)} in all)"
                                                                    if len(unknown) > 20 else ""))
    return out


def _inner(model: Flamingo, index: int) -> str:
    """Our LM block `index` is wrapped (`FlamingoDecoderLayer`) where a cross-attention layer sits in front."""
    return "decoder_layer." if index in model.cross_attn_layers else ""


def load_state_dict(model: Flamingo, hf_state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load Llama 3.2 Vision weights into `model` strictly: every tensor of the model is set, and
    every tensor of the checkpoint is used, or a CheckpointError names the difference."""
    load_strictly(model, map_state_dict(hf_state, model), source, "Llama 3.2 Vision")


# ----------------------------------------------------------------------------------- running
@dataclass
class MllamaOutput(FlamingoOutput):
    group_first: torch.Tensor | None = None  # [B] for the next call's `group_first`


def encode_images(model: Flamingo, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                  aspect_ratio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's image outputs ([B, N, T, 3, H, W], [B, N], [B, N, T]) -> visual tokens
    [B, N, T*P, D] and their key mask [B, N, T*P] (False on padding tiles). Every slot is encoded,
    padding images included, as transformers does: tokens before a sample's first image attend
    to all of them."""
    return model.encode_tiled_media(pixel_values, {"aspect_ratio_ids": aspect_ratio_ids,
                                                   "aspect_ratio_mask": aspect_ratio_mask})


def forward(model: Flamingo, input_ids: torch.Tensor, *, visual_tokens: torch.Tensor | None = None,
            key_mask: torch.Tensor | None = None, num_media: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, media_offset: torch.Tensor | None = None,
            group_first: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
            kv_cache: dict | None = None) -> MllamaOutput:
    """`Flamingo.forward` with the key mask of tiled images (`encode_images`). In cached decoding
    (`media_offset`), group_first [B] is the first image of the group the previous call's last
    token saw (`last_group_first`), so a group of consecutive images stays one."""
    if (visual_tokens is None) != (key_mask is None):
        raise UserError("give visual_tokens and key_mask together (see encode_images)")
    media = model.media_context(input_ids, visual_tokens, num_media=num_media, media_offset=media_offset,
                                kv_cache=kv_cache, key_mask=key_mask)
    if group_first is not None:
        media.token_first_media = group_first_media(input_ids == model.media_token_id, media.token_media,
                                                    group_first.to(input_ids.device))
    out = model.logits_and_cache(input_ids, media, attention_mask=attention_mask,
                                 past_key_values=past_key_values, use_cache=use_cache)
    return MllamaOutput(logits=out.logits, past_key_values=out.past_key_values,
                        group_first=media.token_first_media[:, -1])


@torch.no_grad()
def greedy_generate(model: Flamingo, input_ids: torch.Tensor, *, visual_tokens: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, num_media: torch.Tensor | None = None,
                    max_new_tokens: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the LM's KV cache and the cross-attention keys/values computed once
    (unpadded prompts): the new tokens [B, max_new_tokens] and the logits each was chosen from."""
    counts = (input_ids == model.media_token_id).sum(1) if num_media is None else num_media
    kv: dict = {}
    out = forward(model, input_ids, visual_tokens=visual_tokens, key_mask=key_mask, num_media=counts,
                  use_cache=True, kv_cache=kv)
    tokens, logits = [], []
    for step in range(max_new_tokens):
        logits.append(out.logits[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        if step + 1 < max_new_tokens:
            out = forward(model, tokens[-1], visual_tokens=visual_tokens, key_mask=key_mask, num_media=counts,
                          media_offset=counts, group_first=out.group_first, past_key_values=out.past_key_values,
                          use_cache=True, kv_cache=kv)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


# ----------------------------------------------------------------------------------- loading
def load_checkpoint(directory: str | Path) -> Flamingo:
    """A Llama 3.2 Vision directory as transformers saves it -> our model, every tensor placed
    (`load_state_dict`), in eval mode; its tokenizer and image processor come from the directory."""
    from transformers import AutoTokenizer, MllamaConfig

    directory = Path(directory)
    try:
        hf_config = MllamaConfig.from_pretrained(str(directory))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: cannot read its Llama 3.2 Vision config or tokenizer: "
                              f"{str(err).splitlines()[0][:300]}") from None
    model = build_model(hf_config, tokenizer, source=str(directory))
    load_state_dict(model, read_tensors(directory), source=str(directory))
    model.processor = read_processor(directory)
    return model.eval()


def read_processor(directory: Path) -> Any:
    """The checkpoint's own `MllamaProcessor` (its tokenizer and image processor), None when the
    directory has no processor files (then the model takes visual tokens, not images)."""
    from transformers import MllamaProcessor

    if not (directory / "preprocessor_config.json").is_file() and not (directory / "processor_config.json").is_file():
        return None
    try:
        return MllamaProcessor.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:300]
        raise CheckpointError(f"{directory}: cannot read its image processor: {reason}") from None


# ----------------------------------------------------------------------------------- prompts
def _require_processor(model: Flamingo) -> Any:
    processor = getattr(model, "processor", None)
    if processor is None:
        raise UserError("this Llama 3.2 Vision model was loaded without its image processor "
                        "(no preprocessor_config.json in the checkpoint directory)")
    return processor


def prompt_inputs(model: Flamingo, items: Any) -> Any:
    """An interleaved prompt (str text, PIL images in order) -> exactly what the checkpoint's
    processor builds for the same text and images: input_ids (BOS after any leading images, as
    its processor places it), attention_mask, pixel_values, aspect_ratio_ids/mask."""
    from PIL import Image

    processor = _require_processor(model)
    text, images = [], []
    for item in items:
        if isinstance(item, str):
            if MEDIA_TOKEN in item:
                raise UserError(f"a text item contains {MEDIA_TOKEN!r}; give the image itself where it goes")
            text.append(item)
        elif isinstance(item, Image.Image):
            text.append(MEDIA_TOKEN)
            images.append(item)
        else:
            raise UserError(f"prompt item of type {type(item).__name__}: expected text or a PIL image")
    return processor(text=["".join(text)], images=[images] if images else None, return_tensors="pt")


def chat_inputs(model: Flamingo, messages: list[dict[str, Any]]) -> Any:
    """A chat -> the inputs the checkpoint's processor builds with its chat template (the Llama 3
    format with `<|image|>`), ready for the assistant's answer. messages: {"role": ..., "content":
    a str or a list of str and PIL images, in order}."""
    from PIL import Image

    processor = _require_processor(model)
    conversation = []
    for message in messages:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else list(content or [])
        items = []
        for part in parts:
            if isinstance(part, str):
                items.append({"type": "text", "text": part})
            elif isinstance(part, Image.Image):
                items.append({"type": "image", "image": part})
            else:
                raise UserError(f"chat message content of type {type(part).__name__}: expected text or a PIL image")
        conversation.append({"role": message.get("role"), "content": items})
    if getattr(processor, "chat_template", None) is None:
        raise UserError("this Llama 3.2 Vision checkpoint has no chat template (a base model): use plain prompts")
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def generate_ids(model: Flamingo, items: Any, *, max_new_tokens: int = 20) -> tuple[list[int], str]:
    """Greedy continuation of an interleaved prompt (`prompt_inputs`; or of ready inputs,
    `chat_inputs`) up to the tokenizer's end-of-sequence or end-of-turn token: (the new ids
    without it, "stop_token" or "length")."""
    inputs = items if hasattr(items, "keys") and "input_ids" in items else prompt_inputs(model, items)
    new, _ = greedy_generate(model, inputs["input_ids"], max_new_tokens=max_new_tokens, **_media(model, inputs))
    stops = {model.tokenizer.eos_token_id, model.eoc_token_id}
    ids = new[0].tolist()
    ends = [i for i, token in enumerate(ids) if token in stops]
    return (ids[:ends[0]], "stop_token") if ends else (ids, "length")


def generate_text(model: Flamingo, items: Any, *, max_new_tokens: int = 20) -> str:
    """`generate_ids`, decoded."""
    return model.tokenizer.decode(generate_ids(model, items, max_new_tokens=max_new_tokens)[0],
                                  skip_special_tokens=True)


@torch.no_grad()
def score_candidates(model: Flamingo, items: Any, candidates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate continuation of an interleaved prompt: the summed log-probability of its
    tokens (tokenized alone, no special tokens) and their number, [C] each. The images are
    encoded once; each candidate is one forward pass over the prompt and the candidate."""
    inputs = prompt_inputs(model, items)
    media = _media(model, inputs)
    prompt = inputs["input_ids"]
    sums, counts = [], []
    for text in candidates:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"candidate {text!r} has no tokens")
        full = torch.cat([prompt, torch.tensor([ids])], dim=1)
        logits = forward(model, full, **media).logits[0, prompt.shape[1] - 1:-1].float()
        sums.append(logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum())
        counts.append(len(ids))
    return torch.stack(sums), torch.tensor(counts)


def _media(model: Flamingo, inputs: Any) -> dict[str, Any]:
    if "pixel_values" not in inputs:
        return {}
    tokens, key_mask = encode_images(model, inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                     inputs["aspect_ratio_mask"])
    return dict(visual_tokens=tokens, key_mask=key_mask)


def build_shapes_only(hf_config: Any) -> Flamingo:
    """Our model of `hf_config` on the meta device (no weights, no memory): for parameter counts.
    No tokenizer is read; a placeholder holds the two special tokens at the config's ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    eos = hf_config.text_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    vocab = {"<unk>": hf_config.text_config.pad_token_id or 0, "<|eot_id|>": eos,
             MEDIA_TOKEN: hf_config.image_token_index}
    placeholder = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                          eos_token="<|eot_id|>", pad_token="<unk>")
    with torch.device("meta"):
        return build_model(hf_config, placeholder)


def stack_media(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images as `MLLAMA.preprocess` gives them -> pixel_values [N, T, 3, H, W] and the vision inputs
    aspect_ratio_ids [N] and aspect_ratio_mask [N, T] (`Flamingo.encode_tiled_media`)."""
    return (torch.stack([item["pixel_values"] for item in items]),
            {"aspect_ratio_ids": torch.stack([item["aspect_ratio_id"] for item in items]),
             "aspect_ratio_mask": torch.stack([item["aspect_ratio_mask"] for item in items])})


# ------------------------------------------------------------------ the generic code's interface
class MllamaFamily:
    """`flamingo.model.families.interface.MediaFamily` for Llama 3.2 Vision: prompts tokenized as
    its processor does, images tiled by its image processor and encoded with their key mask of
    padding tiles, chats in its chat template."""

    name = FAMILY
    chat_stop_strings: tuple[str, ...] = ()  # a turn ends with <|eot_id|>, the model's end-of-chunk token

    def tokenize(self, model: Flamingo, text: str, add_special_tokens: bool) -> list[int]:
        """As `MllamaProcessor`: a whole prompt gets BOS after its leading images (unless it holds
        one already, e.g. from the chat template); the ids come without other special tokens."""
        from transformers.models.mllama.processing_mllama import build_string_from_input

        tokenizer = model.tokenizer
        if add_special_tokens and tokenizer.bos_token is not None:
            text = build_string_from_input(text, tokenizer.bos_token, MEDIA_TOKEN)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def preprocess(self, model: Flamingo, frames: Any) -> dict[str, torch.Tensor]:
        """One image -> pixel_values [T, 3, H, W] (T = the config's max tiles, padding tiles
        included), aspect_ratio_id [] and aspect_ratio_mask [T], from the checkpoint's image processor."""
        if len(frames) != 1:
            raise UserError(f"a Llama 3.2 Vision model takes images, not videos (got {len(frames)} frames)")
        processed = _require_processor(model).image_processor(images=[[frames[0]]], return_tensors="pt")
        return {"pixel_values": processed["pixel_values"][0, 0], "aspect_ratio_id": processed["aspect_ratio_ids"][0, 0],
                "aspect_ratio_mask": processed["aspect_ratio_mask"][0, 0]}

    def encode(self, model: Flamingo, media: list[list[dict[str, torch.Tensor]]], chunk: int = 4) -> EncodedMedia:
        """Each image through the tiled vision model and the projector (`chunk` images per call),
        into [B, N, T*P, D] visual tokens and their key mask (False on padding tiles and slots)."""
        tower: MllamaVisionTower = model.vision_encoder
        device = model.perceiver.latents.device
        counts = [len(row) for row in media]
        slots = max(counts, default=0)
        tokens = torch.zeros(len(media), slots, tower.max_tiles * tower.tokens_per_tile, model.perceiver.dim,
                             dtype=model.perceiver.latents.dtype, device=device)
        key_mask = torch.zeros(tokens.shape[:3], dtype=torch.bool, device=device)
        positions = [(b, j) for b, row in enumerate(media) for j in range(len(row))]
        for start in range(0, len(positions), chunk):
            part = positions[start:start + chunk]
            images = [media[b][j] for b, j in part]
            encoded, mask = encode_images(
                model, torch.stack([i["pixel_values"] for i in images])[:, None].to(device),
                torch.stack([i["aspect_ratio_id"] for i in images])[:, None].to(device),
                torch.stack([i["aspect_ratio_mask"] for i in images])[:, None].to(device))
            for (b, j), t, m in zip(part, encoded[:, 0], mask[:, 0]):
                tokens[b, j], key_mask[b, j] = t, m
        return EncodedMedia(tokens, torch.tensor(counts, device=device), key_mask)

    def chat_text(self, model: Flamingo, messages: list[ChatMessage]) -> str:
        """The checkpoint's chat template (the Llama 3 format with `<|image|>`) over the messages,
        with the assistant's header at the end."""
        processor = _require_processor(model)
        if getattr(processor, "chat_template", None) is None:
            raise UserError("this Llama 3.2 Vision checkpoint has no chat template (a base model): use plain prompts")
        conversation = [{"role": m.role, "content": [{"type": "image"} if part is MEDIA else
                                                     {"type": "text", "text": part} for part in m.content]}
                        for m in messages]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


MLLAMA = MEDIA_FAMILY = MllamaFamily()
