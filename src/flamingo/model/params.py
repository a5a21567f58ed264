"""Parameter counts per component, in the manner of the paper's Table 1."""

from __future__ import annotations

from dataclasses import dataclass

from flamingo.model.flamingo import Flamingo


@dataclass
class ComponentCount:
    name: str
    parameters: int
    trainable: bool


# What sits between the vision encoder and the cross-attention layers, by `perceiver.kind`.
_BRIDGE_INPUT = {"linear": "linear projector", "identity": "no resampler (features as tokens)"}


def parameter_report(model: Flamingo) -> list[ComponentCount]:
    def count(params) -> int:
        unique = {id(p): p for p in params}
        return sum(p.numel() for p in unique.values())

    xattn = [p for block in model.cross_attn_layers.values() for p in block.parameters()]
    new_tokens = [model.input_embeddings.new_rows]
    if not model.tied_new_rows:
        new_tokens += [p for n, p in model.output_head.named_parameters() if n.startswith("new_")]
    # LM blocks unfrozen for fine-tuning (config.unfreeze) are counted apart from the frozen LM.
    blocks = {key: module for key, module in model.unfrozen_backbone.items() if key.startswith("lm_blocks.")}
    unfrozen = [p for module in blocks.values() for p in module.parameters()]
    bridge_ids = {id(p) for p in xattn + new_tokens + unfrozen}
    vision_trainable = "vision_encoder" in model.unfrozen_backbone
    rows = [
        ComponentCount("language model (frozen)", count(p for p in model.lm.parameters() if id(p) not in bridge_ids), False),
        ComponentCount(f"vision encoder ({'unfrozen' if vision_trainable else 'frozen'})",
                       count(model.vision_encoder.parameters()) if model.vision_encoder is not None else 0,
                       vision_trainable),
        ComponentCount("gated xattn-dense layers", count(xattn), True),
        ComponentCount(_BRIDGE_INPUT.get(model.config.perceiver.kind, "perceiver resampler"),
                       count(model.perceiver.parameters()), True),
        ComponentCount("new token embeddings", count(new_tokens), True),
    ]
    if blocks:
        names = ", ".join(key.split(".")[1] for key in blocks)
        rows.insert(1, ComponentCount(f"language model blocks {names} (unfrozen)", count(unfrozen), True))
    return rows


def format_parameter_report(rows: list[ComponentCount]) -> str:
    def human(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return str(n)

    width = max(len(r.name) for r in rows)
    lines = [f"{'component':<{width}}  {'parameters':>12}  {'':>8}  status"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.parameters:>12,}  {human(r.parameters):>8}  "
                     f"{'trainable' if r.trainable else 'frozen'}")
    total = sum(r.parameters for r in rows)
    trainable = sum(r.parameters for r in rows if r.trainable)
    lines.append(f"{'total':<{width}}  {total:>12,}  {human(total):>8}  "
                 f"({human(trainable)} trainable, {100 * trainable / max(total, 1):.1f}%)")
    return "\n".join(lines)
