"""How well a frozen vision encoder's features separate the clip-art categories, with no bridge:
the ceiling the embedded model's few-shot binding on held-out categories runs into (README, "Real
drawn objects"). Three probes on the encoder's features, mean-pooled over its grid:

- nearest class mean on binding episodes (as `flamingo eval-offline --task objects-binding` draws
  them: the objects composed on varied backgrounds), centred per episode, cosine;
- the same with every object alone on white;
- a supervised linear probe per split (objects on white, k-fold): whether the categories are
  separable at all when they are trained on.

    python scripts/clipart_feature_probe.py                 # the embedded model's EfficientNet-Lite0
    python scripts/clipart_feature_probe.py --episodes 128 --ways 3
    python scripts/clipart_feature_probe.py --vision runs/clipart-vision/vision   # a pretrain-vision tower
    python scripts/clipart_feature_probe.py --stage resampler   # the model's visual tokens (after the resampler)
    python scripts/clipart_feature_probe.py --stage resampler --pool concat   # all 16 latents, concatenated
    python scripts/clipart_feature_probe.py --stage resampler --pool each     # each latent alone (best, median)

`--stage resampler` probes what the cross-attention layers read, the Perceiver Resampler's latents
(mean-pooled), instead of the encoder's grid: whether the resampler keeps what the features carry.
`--pool concat|each` probes the latents (or grid cells) concatenated or one at a time: the mean is a
lower bound of what the cross-attention, which attends to each latent, can read.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# How the tokens of an image ([K, tokens, D]) become the vectors probed: their mean, all of them
# concatenated, or each token alone (one probe per token position: per latent of the resampler).
POOLS = {"mean": lambda tokens: [tokens.mean(1)], "concat": lambda tokens: [tokens.flatten(1)],
         "each": lambda tokens: list(tokens.unbind(1))}


def pooled_features(encoder, images, pool: str = "mean") -> list[torch.Tensor]:
    """[K, D'] views of the images' tokens pooled by `pool` (POOLS; one view but for "each"), first
    `encoder`-native channels only (not the colour bins)."""
    processor = encoder.image_processor()
    with torch.inference_mode():
        features = encoder.encode(torch.stack([processor(image) for image in images]))
    width = features.shape[-1] - getattr(encoder, "colour_bins", 0) ** 3
    return POOLS[pool](features[..., :width].float())


class ResamplerTokens:
    """A model's visual tokens (vision encoder then Perceiver Resampler) behind the encoder interface
    the probes take: `encode(pixels [K, 3, H, W])` -> [K, latents, D]."""

    def __init__(self, model) -> None:
        self.model = model

    def image_processor(self):
        return self.model.vision_encoder.image_processor()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_media(pixels[:, None, None])[:, 0]


def prototype_accuracy(encoder, catalogue, split: str, *, ways: int, shots: int, episodes: int,
                       on_white: bool, seed: int = 0, pool: str = "mean") -> list[float]:
    """Nearest class mean (episode-centred cosine) on `episodes` binding episodes of the split, one
    accuracy per view of `pool`."""
    from flamingo.data import clipart
    from flamingo.data.procedural import Segment, word_binding_episode

    names = catalogue.names(split)
    correct = None
    for index in range(episodes):
        rng = np.random.default_rng([seed, index])
        categories = [names[int(i)] for i in rng.choice(len(names), size=ways, replace=False)]  # as binding_episode

        def draw(category: str) -> Segment:
            if on_white:
                return Segment(clipart.show_object(catalogue.pick(rng, split, category)), [])
            return clipart.object_segment(catalogue, rng, 224, split, category)[0]

        support, query, answer, _ = word_binding_episode(rng, categories, split, shots, draw)
        labels = [segment.text[1][0] for segment in support]
        views = pooled_features(encoder, [segment.image for segment in support] + [query.image], pool)
        correct = correct if correct is not None else [0] * len(views)
        for view, features in enumerate(views):
            features = torch.nn.functional.normalize(features - features.mean(0), dim=-1)
            means = {label: features[[i for i, x in enumerate(labels) if x == label]].mean(0)
                     for label in set(labels)}
            correct[view] += max(means, key=lambda label: float(features[-1] @ means[label])) == answer
    return [c / episodes for c in correct]


def linear_probe_accuracy(encoder, catalogue, split: str, *, folds: int = 4, seed: int = 0,
                          pool: str = "mean") -> list[float]:
    """k-fold accuracy of a multinomial logistic regression on the split's categories (objects on
    white), one per view of `pool`."""
    from flamingo.data import clipart

    names = catalogue.names(split)
    items = [(item, label) for label, name in enumerate(names) for item in catalogue.by_category[name]]
    batches = [pooled_features(encoder, [clipart.show_object(item) for item, _ in items[i:i + 16]], pool)
               for i in range(0, len(items), 16)]
    labels = torch.tensor([label for _, label in items])
    order = torch.tensor(np.random.default_rng(seed).permutation(len(items)))
    return [_linear_probe(torch.cat([views[v] for views in batches]), labels, len(names), order, folds)
            for v in range(len(batches[0]))]


def _linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, order: torch.Tensor,
                  folds: int) -> float:
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = order[torch.isin(order, test, invert=True)]
        weight = torch.zeros(features.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(features[train] @ weight + bias, labels[train])
            value = value + 1e-2 * weight.pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        with torch.no_grad():
            correct += int(((features[test] @ weight + bias).argmax(1) == labels[test]).sum())
    return correct / len(labels)


def summary(accuracies: list[float]) -> str:
    """One view: its accuracy; one per token: the best token's, the median and the mean over tokens."""
    if len(accuracies) == 1:
        return f"{100 * accuracies[0]:.1f}%"
    return (f"best {100 * max(accuracies):.1f}% (token {int(np.argmax(accuracies))}), median "
            f"{100 * float(np.median(accuracies)):.1f}%, mean {100 * float(np.mean(accuracies)):.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="a Flamingo whose vision encoder is probed")
    parser.add_argument("--vision", help="probe this vision encoder instead (a directory `flamingo pretrain-vision` "
                        "wrote: RUN_DIR/vision)")
    parser.add_argument("--stage", choices=("encoder", "resampler"), default="encoder",
                        help="probe the encoder's pooled grid, or the resampler's latents (the model's visual tokens)")
    parser.add_argument("--pool", choices=tuple(POOLS), default="mean",
                        help="the probed vector of an image: the mean of its tokens (default), all of them "
                             "concatenated, or each token alone (the best, median and mean token reported)")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--ways", type=int, default=2)
    parser.add_argument("--shots", type=int, default=4)
    args = parser.parse_args()
    if args.vision and args.stage == "resampler":
        print("clipart_feature_probe: --stage resampler probes a model's visual tokens; give --model, not --vision",
              file=sys.stderr)
        return 2

    from flamingo.cli_options import load_model_quietly
    from flamingo.data import clipart
    from flamingo.errors import UserError

    try:
        catalogue = clipart.catalogue()
        if args.vision:
            from flamingo.model.vision import load_vision_encoder
            encoder = load_vision_encoder(args.vision)
        else:
            model = load_model_quietly(args.model, trust_remote_code=False)
            encoder = ResamplerTokens(model) if args.stage == "resampler" else model.vision_encoder
    except UserError as error:
        print(f"clipart_feature_probe: {error}", file=sys.stderr)
        return 2
    print(f"| probe of the {args.stage}, tokens pooled: {args.pool} ({args.ways}-way, {args.shots} shots, "
          f"{args.episodes} episodes) | "
          f"held-out categories | "
          f"training categories |\n|---|---|---|")
    for on_white in (False, True):
        cells = [prototype_accuracy(encoder, catalogue, split, ways=args.ways, shots=args.shots,
                                    episodes=args.episodes, on_white=on_white, pool=args.pool)
                 for split in ("eval", "train")]
        view = "objects alone on white" if on_white else "objects composed as in the episodes"
        print(f"| nearest class mean, {view} | " + " | ".join(map(summary, cells)) + " |", flush=True)
    cells = [linear_probe_accuracy(encoder, catalogue, split, pool=args.pool) for split in ("eval", "train")]
    print("| linear probe on all the split's categories (4-fold, on white) | " +
          " | ".join(map(summary, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
