"""Where a binding episode's answer position looks, in the frozen LM's self-attention (issue 22).

With the paper's masking (`cross_attention.media_attention: previous`, the embedded model's), every
text token cross-attends only to the last image before it: the query's "This is a" sees the query
image, each support chunk's word sees its own image. The match between the query and a support image
can therefore only happen in the LM's self-attention, from the answer position back to the support
chunks' tokens, which carry what their image injected. This measures it: for the last prompt token of
`flamingo eval-offline`'s episodes, per LM block, the self-attention mass (mean over heads) on the
support chunks whose word is the answer vs on the others, as the share on the right ones (0.5: no
preference, at 4 shots 2-way where each word is shown twice), and the share of episodes where the
right chunks get more.

    python scripts/binding_attention.py --task objects-binding --task binding --episodes 32
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def chunk_spans(ids: list[int], media_id: int, eoc_id: int) -> list[tuple[int, int]]:
    """[start, end) of each support chunk: from its media token to its <|endofchunk|> included."""
    spans, start = [], None
    for position, token in enumerate(ids):
        if token == media_id:
            start = position
        elif token == eoc_id and start is not None:
            spans.append((start, position + 1))
            start = None
    return spans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--task", action="append", help="episodes of flamingo eval-offline (default objects-binding "
                        "and binding)")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flamingo.cli_options import load_model_quietly
    from flamingo.data.episodes import episode_items, make_episode
    from flamingo.inference.prompt import interleaved_prompt
    from flamingo.inference.state import encode_prompts

    model = load_model_quietly(args.model, trust_remote_code=False)
    model.lm.set_attn_implementation("eager")  # the attention weights, which SDPA does not return
    layers = [module for name, module in model.lm.named_modules() if name.endswith("self_attn")]
    captured: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_hook(lambda _m, _a, out: captured.append(out[1][0, :, -1].float()))
    media_id, eoc_id = model.media_token_id, model.eoc_token_id
    print(f"| task ({args.shots} shots, {args.episodes} episodes, seed {args.seed}) | blocks with the highest share "
          f"on the right chunks: share (episodes where right > wrong) | mean over all {len(layers)} blocks |")
    print("|---|---|---|")
    for task in args.task or ["objects-binding", "binding"]:
        shares = []  # [episodes, layers]
        for index in range(args.episodes):
            support, query, answer, _ = make_episode(task, args.shots, args.seed, index)
            prompt = interleaved_prompt(episode_items(support, query, model.config.end_of_chunk_token),
                                        model.config.media_token)
            ids = model.tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
            spans = chunk_spans(ids, media_id, eoc_id)
            right = [s.text[1][0] == answer for s in support]
            captured.clear()
            encode_prompts(model, [prompt])
            row = []
            for weights in captured:  # [heads, keys] of the last position, one per block
                mass = weights.mean(0)
                on = [float(mass[a:b].sum()) for a, b in spans]
                good = sum(m for m, r in zip(on, right) if r) / max(sum(right), 1)
                bad = sum(m for m, r in zip(on, right) if not r) / max(len(right) - sum(right), 1)
                row.append(good / (good + bad) if good + bad > 0 else 0.5)
            shares.append(row)
        shares_array = np.array(shares)
        mean = shares_array.mean(0)
        top = np.argsort(-mean)[:3]
        cells = ", ".join(f"block {b}: {mean[b]:.2f} ({100 * (shares_array[:, b] > 0.5).mean():.0f}%)" for b in top)
        print(f"| {task} | {cells} | {mean.mean():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
