"""Serving a Llama 3.2 Vision model: our engine vs transformers' own `generate`, one request at a time.

The model: a random Llama-3.2-Vision-shaped checkpoint built here with transformers' own
`MllamaForConditionalGeneration` (a Llama text model with gated cross-attention blocks, the tiled
vision model with local and global layers, the projector), saved with `save_pretrained` (sharded
safetensors) beside an `MllamaProcessor` with the Llama 3 chat template, and loaded by us with
`load_model(directory)` as `flamingo serve --model DIRECTORY` does. It is tiny next to the 11B
model but wide enough that the forward passes dominate both sides (the default: a 768-wide,
10-block text model with a 8192-word vocabulary, 4-tile images of 65 patch tokens per tile through a
256-wide, 6-layer vision model), not Python overhead; `--quick` shrinks it to check that the script
runs.

The same 64 requests, all arriving at once, greedy, up to `--max-tokens` new tokens: 32 few-shot
requests (`--shots` examples `<|image|>Output: <caption>.<|eot_id|>` over one shared support set,
then a query image) and 32 chats (the checkpoint's chat template, one image and a question).

- Ours: `flamingo.serving.engine.Engine` in this process (continuous batching, prefills before
  decode steps, the prefix cache: the support set is encoded once).
- Transformers: what its users run today, one request at a time: the checkpoint's processor
  (tiles, aspect ratios, cross-attention mask), then `MllamaForConditionalGeneration.generate`
  (KV-cached greedy decoding, stopping at <|eot_id|> or the end of text); every request's images
  are encoded again.

Both sides decode the PNG bytes of each image and preprocess them inside the timing, run in this
process with the same torch threads on the same weights, and are warmed up first (one chat and one
few-shot prompt over another support set). Printed: seconds, requests/s and tokens/s of each, the
answers that differ (ours are checked against transformers' token for token, up to float noise in
batched matmuls), and the prefix cache's hits and misses.

    flock /tmp/flamingo-cpu.lock python benchmarks/serve_families.py [--requests 64] [--max-tokens 16]

The last line is `mllama serving throughput vs transformers generate: X.XXx` (their time / ours).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (offline, quiet transformers)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flamingo.model.weights import load_model  # noqa: E402
from flamingo.serving.engine import Engine, EngineConfig, EngineRequest, SamplingParams  # noqa: E402

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>",
           "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_CHAT_TEMPLATE = (  # the Llama 3 chat format with <|image|>, as Llama 3.2 Vision's template writes it
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def sizes(quick: bool) -> dict:
    if quick:
        return dict(vocab=512, hidden=64, layers=4, crosses=[1], intermediate=128, heads=4, kv_heads=2,
                    image=28, vision_hidden=32, vision_layers=2, global_layers=1, indices=[0])
    return dict(vocab=8192, hidden=768, layers=10, crosses=[3, 7], intermediate=2048, heads=12, kv_heads=4,
                image=112, vision_hidden=256, vision_layers=4, global_layers=2, indices=[1, 3])


def words(vocab: int) -> list[str]:
    return [f"w{i}" for i in range(vocab - len(SPECIAL))]


def build_checkpoint(directory: Path, s: dict) -> None:
    """A random Llama-3.2-Vision-shaped checkpoint and its processor, as transformers saves them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {token: i for i, token in enumerate(SPECIAL + words(s["vocab"]))}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<|finetune_right_pad_id|>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                        pad_token=SPECIAL[2])
    tokenizer.add_tokens(["<|image|>"], special_tokens=True)  # id vocab: the first of the 8 extra rows
    config = MllamaConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], cross_attention_layers=s["crosses"],
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(hidden_size=s["vision_hidden"], num_hidden_layers=s["vision_layers"],
                           num_global_layers=s["global_layers"], attention_heads=4,
                           intermediate_size=4 * s["vision_hidden"], image_size=s["image"], patch_size=14,
                           intermediate_layers_indices=s["indices"],
                           vision_output_dim=s["vision_hidden"] * (len(s["indices"]) + 1)),
        image_token_index=s["vocab"])
    torch.manual_seed(0)
    reference = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # the gates start at 0 (no image would matter): open them
        for name, param in reference.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)
    reference.save_pretrained(directory, max_shard_size="200MB")
    tiles = MllamaImageProcessorPil(size={"height": s["image"], "width": s["image"]}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=tiles, tokenizer=tokenizer, chat_template=LLAMA3_CHAT_TEMPLATE)
    processor.save_pretrained(directory)


def png(rng: np.random.Generator) -> bytes:
    """A random image of a random aspect ratio (1 to 4 tiles)."""
    width, height = (int(x) for x in rng.integers(40, 400, 2))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_requests(processor, vocab: list[str], count: int, shots: int, max_tokens: int,
                  seed: int = 0) -> list[EngineRequest]:
    """Few-shot and chat requests, alternating; the few-shot ones share one support set."""
    rng = np.random.default_rng(seed)
    caption = lambda n: " ".join(rng.choice(vocab, n))  # noqa: E731
    support_text = "".join(f"<|image|>Output: {caption(4)}.<|eot_id|>" for _ in range(shots))
    support_images = [png(rng) for _ in range(shots)]
    params = SamplingParams(max_tokens=max_tokens)
    requests = []
    for i in range(count):
        if i % 2 == 0:
            requests.append(EngineRequest(support_text + "<|image|>Output:", support_images + [png(rng)], params))
        else:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption(8) + "?"}]}]
            text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            requests.append(EngineRequest(text, [png(rng)], params))
    return requests


def transformers_one(reference, processor, request: EngineRequest, stops: list[int]) -> tuple[str, int]:
    """One request as transformers' users run it: (the answer, generated tokens)."""
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in request.images]
    inputs = processor(text=[request.text], images=[images], return_tensors="pt")
    with torch.inference_mode():
        out = reference.generate(**inputs, max_new_tokens=request.params.max_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=processor.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((i for i, token in enumerate(new) if token in stops), len(new))
    return processor.tokenizer.decode(new[:cut]), cut + (cut < len(new))


def run_transformers(reference, processor, requests: list[EngineRequest], stops: list[int]) -> dict:
    start = time.perf_counter()
    results = [transformers_one(reference, processor, r, stops) for r in requests]
    return {"seconds": time.perf_counter() - start, "texts": [t for t, _ in results],
            "tokens": sum(n for _, n in results)}


async def run_engine(engine: Engine, requests: list[EngineRequest]) -> dict:
    async def one(stream) -> tuple[str, int]:
        text, tokens = "", 0
        async for delta in stream:
            text += delta.text
            if delta.finish_reason is not None:
                tokens = delta.completion_tokens
        return text, tokens

    start = time.perf_counter()
    streams = [engine.generate(request) for request in requests]  # all arrive at once
    results = await asyncio.gather(*(one(stream) for stream in streams))
    return {"seconds": time.perf_counter() - start, "texts": [t for t, _ in results],
            "tokens": sum(n for _, n in results)}


def report(name: str, run: dict, count: int) -> None:
    print(f"{name:12s} {run['seconds']:7.2f} s   {count / run['seconds']:6.2f} requests/s   "
          f"{run['tokens'] / run['seconds']:7.1f} tokens/s")


async def main_async(args: argparse.Namespace) -> None:
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    s = sizes(args.quick)
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        build_checkpoint(directory, s)
        reference = MllamaForConditionalGeneration.from_pretrained(directory).eval()
        processor = MllamaProcessor.from_pretrained(directory)
        model = load_model(directory)  # as flamingo serve --model DIRECTORY loads it
    vocab = words(s["vocab"])
    requests = make_requests(processor, vocab, args.requests, args.shots, args.max_tokens)
    warm_up = make_requests(processor, vocab, 2, args.shots, args.max_tokens, seed=1)
    stops = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    print(f"{len(requests)} requests ({sum(len(r.images) > 1 for r in requests)} {args.shots}-shot, the others "
          f"chat), max {args.max_tokens} new tokens, greedy; text model {s['hidden']} wide, {s['layers']} blocks; "
          f"torch threads {torch.get_num_threads()}")

    for request in warm_up:
        transformers_one(reference, processor, request, stops)
    theirs = run_transformers(reference, processor, requests, stops)
    engine = Engine(model, EngineConfig(max_queue=max(64, args.requests), max_running=args.max_running))
    await engine.start()
    try:
        await run_engine(engine, warm_up)
        ours = await run_engine(engine, requests)
    finally:
        await engine.stop()
    report("transformers", theirs, len(requests))
    report("engine", ours, len(requests))
    differ = [i for i, (a, b) in enumerate(zip(ours["texts"], theirs["texts"])) if a != b]
    print(f"answers that differ from transformers': {len(differ)} of {len(requests)} {differ[:10]}")
    metrics = engine.metrics
    print(f"prefix cache: {metrics.prefix_cache_hits._value.get():.0f} hits, "
          f"{metrics.prefix_cache_misses._value.get():.0f} misses")
    print(f"mllama serving throughput vs transformers generate: {theirs['seconds'] / ours['seconds']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=EngineConfig.max_running)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few requests: check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 8)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
