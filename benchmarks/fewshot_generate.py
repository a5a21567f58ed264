"""Few-shot generation benchmark: ours vs OpenFlamingo 2.0.1 on the identical small model.

Task: an 8-shot prompt (8 support examples `<image>output <caption><|endofchunk|>`, captions of
1-3 words) shared by 32 queries (`<image>output`, one new image each); beam search with 3 beams,
10 new tokens, length penalty 0 and stopping at `<|endofchunk|>` (OpenFlamingo's VQA/captioning
evaluation settings: `evaluate_vqa(num_beams=3, length_penalty=0.0)`, TextVQA with
`max_generation_length=10`).

- Ours: `FewShotContext(model, support)` encodes the support examples once; `.generate(queries,
  num_beams=3, max_new_tokens=10, length_penalty=0.0)` appends all 32 queries to that cache
  (`extend`) and beam-searches them together (96 rows; beams share their sample's visual tokens
  and cross-attention keys/values). Timed from the PIL images (our preprocessing included).
- OpenFlamingo: its evaluation loop (`evaluate_vqa` / `evaluate_captioning` -> `EvalModel.
  get_outputs`, reproduced in `_of_worker.py`): batches of 8 queries (eval's default
  --batch_size), each query with the full 8-shot prompt and its 9 images, one
  `model.generate(vision_x, lang_x, attention_mask, min_new_tokens=0, max_new_tokens=10,
  num_beams=3, length_penalty=0.0)` per batch. Timed from pixel tensors.

Model, weights, equivalence and memory method: see `_inference_common.py`. The check compares
prompt ids, next-token logits and greedy tokens for the first query, then the beam-3 outputs of
all 32 queries (not a hard failure if a few differ: near-ties can flip under float noise).

    python benchmarks/fewshot_generate.py [--reps 5] [--threads 2] [--quick] [--no-memory]

The last line is `few-shot generation speedup vs OpenFlamingo: X.XXx` (OF median / ours median).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _inference_common as IC  # noqa: E402,N812
from flamingo.inference import FewShotContext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=10)
    IC.add_common_args(parser, reps=5)
    args = parser.parse_args()
    if args.quick:
        args.queries = min(args.queries, 8)

    h = IC.Harness(args, default_reps=5)
    try:
        h.describe()
        task = IC.make_task("generate", h.model.tokenizer, shots=args.shots, queries=args.queries,
                            num_beams=args.beams, max_new_tokens=args.new_tokens)
        h.set_task(task, IC.make_images(args.shots + args.queries, h.sizes.image_size))
        prompt_tokens = len(h.model.tokenizer(task.support_text + task.query_texts[0])["input_ids"])
        print(f"task: {args.shots}-shot prompt ({prompt_tokens} tokens with a query, {args.shots + 1} images) x "
              f"{args.queries} queries sharing the support examples; beam {args.beams}, {args.new_tokens} new tokens, "
              f"length penalty {task.length_penalty}; OpenFlamingo eval batch size {task.of_batch_size}")
        h.check_prompt(0, greedy_tokens=args.new_tokens)

        queries = h.query_prompts()

        def ours():
            context = FewShotContext(h.model, h.support_prompt())
            return context.generate(queries, num_beams=args.beams, max_new_tokens=args.new_tokens,
                                    length_penalty=task.length_penalty)

        timing = h.compare_timing(ours)
        stops = {h.model.eoc_token_id}
        of_ids = [IC.cut_at(ids, stops) for ids in timing["of_out"]["ids"]]
        ours_ids = [g.token_ids for g in timing["ours_out"]]
        same = sum(a == b for a, b in zip(ours_ids, of_ids))
        print(f"check: beam-{args.beams} outputs identical for {same}/{len(of_ids)} queries"
              + ("" if same == len(of_ids) else
                 f" (first difference: query {next(i for i, (a, b) in enumerate(zip(ours_ids, of_ids)) if a != b)})"))
        memory = h.compare_memory(ours)
        h.report(timing, memory, "few-shot generation")
    finally:
        h.close()


if __name__ == "__main__":
    main()
