"""Beam-decoding benchmark: ours vs OpenFlamingo 2.0.1 on the identical small model.

Task: one prompt (a 4-shot captioning prompt and its query: 5 images, `<image>output <caption>
<|endofchunk|>` x 4 + `<image>output`), beam search with 3 beams, 32 new tokens, length penalty 0
(OpenFlamingo eval's setting), stopping at `<|endofchunk|>` (the random model practically never
emits it, so both sides decode all 32 tokens).

- Ours: `encode_prompts(model, [prompt])` then `generate(model, state, GenerationConfig(
  num_beams=3, max_new_tokens=32, length_penalty=0.0))`: the prompt runs once (one row), the
  3 beams continue its KV cache and share its visual tokens and cross-attention keys/values.
  Timed from the PIL images (our preprocessing included).
- OpenFlamingo: its evaluation path for one query (`EvalModel.get_outputs`, reproduced in
  `_of_worker.py`): `model.generate(vision_x, lang_x, attention_mask, min_new_tokens=0,
  max_new_tokens=32, num_beams=3, length_penalty=0.0)`, i.e. Hugging Face beam search over
  OpenFlamingo's conditioned LM. Timed from pixel tensors.

Model, weights, equivalence and memory method: see `_inference_common.py`. The check compares
prompt ids, next-token logits, 32 greedy tokens, and the beam-3 output.

    python benchmarks/decode.py [--reps 7] [--threads 2] [--quick] [--no-memory]

The last line is `beam-3 decoding speedup vs OpenFlamingo: X.XXx` (OF median / ours median).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _inference_common as IC  # noqa: E402,N812
from flamingo.inference import GenerationConfig, encode_prompts, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4, help="support examples in the prompt")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    IC.add_common_args(parser, reps=7)
    args = parser.parse_args()

    h = IC.Harness(args, default_reps=7)
    try:
        h.describe()
        task = IC.make_task("generate", h.model.tokenizer, shots=args.shots, queries=1, num_beams=args.beams,
                            max_new_tokens=args.new_tokens)
        h.set_task(task, IC.make_images(args.shots + 1, h.sizes.image_size))
        prompt = h.full_prompt(0)
        prompt_tokens = len(h.model.tokenizer(prompt.text)["input_ids"])
        print(f"task: one prompt ({args.shots}-shot + query: {prompt_tokens} tokens, {args.shots + 1} images); "
              f"beam {args.beams}, {args.new_tokens} new tokens, length penalty {task.length_penalty}")
        h.check_prompt(0, greedy_tokens=args.new_tokens)

        config = GenerationConfig(num_beams=args.beams, max_new_tokens=args.new_tokens,
                                  length_penalty=task.length_penalty)

        def ours():
            state = encode_prompts(h.model, [prompt], max_new_tokens=args.new_tokens)
            return generate(h.model, state, config)

        timing = h.compare_timing(ours)
        of_ids = IC.cut_at(timing["of_out"]["ids"][0], {h.model.eoc_token_id})
        ours_ids = timing["ours_out"][0].token_ids
        print(f"check: beam-{args.beams} output ({len(ours_ids)} tokens) "
              + ("identical" if ours_ids == of_ids else f"DIFFERS: ours {ours_ids}, OF {of_ids}"))
        memory = h.compare_memory(ours)
        h.report(timing, memory, f"beam-{args.beams} decoding")
    finally:
        h.close()


if __name__ == "__main__":
    main()
