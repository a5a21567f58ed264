"""Class-ranking benchmark: ours vs OpenFlamingo 2.0.1 on the identical small model.

Task: a 4-shot prompt (`<image>output <class name><|endofchunk|>` x 4, OpenFlamingo's ImageNet
prompt with `output` for `Output:`) shared by 16 queries (`<image>output`, one new image each);
rank 100 class names of 1-3 tokens (2 on average) for every query by their length-normalised
log-likelihood (OpenFlamingo's `evaluate_classification` uses `normalize_length=True`).

- Ours: `FewShotContext(model, support).rank(queries, class_names, normalise_length=True)`:
  the support examples run once, the 16 queries are appended to that cache (`extend`), and the
  1,600 (query, class) continuations are scored: a class name's first token from the query's own
  next-token prediction, its other tokens by feeding it up to its last-but-one token, grouped by
  length (no padding) in forwards of up to 128 rows made of whole queries (which then share
  their visual tokens and cross-attention keys/values). Timed from the PIL images (our
  preprocessing included).
- OpenFlamingo: its evaluation loop (`evaluate_classification` -> `EvalModel.
  get_rank_classifications(use_cache=True, normalize_length=True)` -> `get_predicted_classnames`,
  reproduced in `_of_worker.py`): batches of 8 queries (eval's default --batch_size), each with
  the full 4-shot prompt; per batch `cache_media` + one forward of the prompts keeping their KV
  cache, then for each class name a token-by-token forward of its tokens from that cache and a
  log-softmax over the prompt's and the class's logits. Timed from pixel tensors.

Model, weights, equivalence and memory method: see `_inference_common.py`. The check compares
prompt ids, next-token logits and greedy tokens for the first query, then for all 16 queries the
class scores (max |difference|) and orders (top-1, top-5 and full order agreement).

    python benchmarks/rank_classes.py [--reps 3] [--threads 2] [--quick] [--no-memory]

The last line is `class ranking speedup vs OpenFlamingo: X.XXx` (OF median / ours median).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _inference_common as IC  # noqa: E402,N812
import torch  # noqa: E402
from flamingo.inference import FewShotContext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--classes", type=int, default=100)
    IC.add_common_args(parser, reps=3)
    args = parser.parse_args()
    if args.quick:
        args.classes = min(args.classes, 20)

    h = IC.Harness(args, default_reps=3)
    try:
        h.describe()
        task = IC.make_task("rank", h.model.tokenizer, shots=args.shots, queries=args.queries, classes=args.classes)
        h.set_task(task, IC.make_images(args.shots + args.queries, h.sizes.image_size))
        tok = h.model.tokenizer
        prompt_tokens = len(tok(task.support_text + task.query_texts[0])["input_ids"])
        class_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in task.class_names]
        print(f"task: {args.shots}-shot prompt ({prompt_tokens} tokens with a query, {args.shots + 1} images) x "
              f"{args.queries} queries sharing the support examples; {args.classes} class names of "
              f"{min(class_tokens)}-{max(class_tokens)} tokens (mean {sum(class_tokens) / len(class_tokens):.2f}), "
              f"length-normalised log-likelihood; OpenFlamingo eval batch size {task.of_batch_size}")
        h.check_prompt(0, greedy_tokens=5)

        queries = h.query_prompts()

        def ours():
            context = FewShotContext(h.model, h.support_prompt())
            return context.rank(queries, task.class_names, normalise_length=task.normalize_length)

        timing = h.compare_timing(ours)
        order, scores = timing["ours_out"]
        of_scores = torch.tensor(timing["of_out"]["scores"])
        of_order = of_scores.argsort(dim=-1, descending=True)
        diff = (scores - of_scores).abs().max().item()
        top1 = (order[:, 0] == of_order[:, 0]).sum().item()
        top5 = (order[:, :5] == of_order[:, :5]).all(-1).sum().item()
        full = (order == of_order).all(-1).sum().item()
        n = len(order)
        print(f"check: class scores max |ours - OF| {diff:.1e}; same top-1 class for {top1}/{n} queries, same top-5 "
              f"order for {top5}/{n}, same full order of {args.classes} classes for {full}/{n}")
        memory = h.compare_memory(ours)
        h.report(timing, memory, "class ranking")
    finally:
        h.close()


if __name__ == "__main__":
    main()
