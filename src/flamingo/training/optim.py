"""AdamW over the trainable bridge, the learning-rate schedule and global-norm clipping.

Paper (section 3 / B.1.2): AdamW, learning rate warmed up linearly from 0 to 1e-4 over 5000
steps and then kept constant, global-norm gradient clipping at 1.0, weight decay 0.1 on the
trainable parameters except the Perceiver Resampler, which gets none. "Except the resampler" is
all the paper says, so LayerNorms, biases and the tanh gates are decayed too by default
(`optim.decay_norms_biases_gates: true`); false exempts every parameter of <= 1 dimension as
most other recipes do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from flamingo.model.config import ConfigError
from flamingo.training.config import OptimConfig, ScheduleConfig


def no_decay(name: str, param: torch.Tensor, config: OptimConfig) -> bool:
    """Whether the trainable parameter `name` (a `trainable_state_dict` key) gets no weight decay."""
    if any(name == prefix or name.startswith(prefix + ".") for prefix in config.no_decay):
        return True
    return not config.decay_norms_biases_gates and param.ndim <= 1


def _by_prefix(name: str, table: dict[str, Any], default: Any) -> Any:
    """The value of the longest prefix in `table` that `name` equals or starts with (dotted)."""
    matches = [p for p in table if name == p or name.startswith(p + ".")]
    return table[max(matches, key=len)] if matches else default


def lr_scale(name: str, config: OptimConfig) -> float:
    """The learning-rate multiplier of `name`: that of the longest matching `lr_scale` prefix."""
    return float(_by_prefix(name, config.lr_scale, 1.0))


def lr_delay(name: str, config: OptimConfig) -> int:
    """Updates during which `name` stays frozen: that of the longest matching `lr_delay` prefix."""
    return int(_by_prefix(name, config.lr_delay, 0))


def parameter_groups(named_params: dict[str, nn.Parameter], config: OptimConfig) -> list[dict]:
    """AdamW groups, "decay" (weight_decay) and "no_decay" (0) — split further by learning-rate
    multiplier and delay when `lr_scale` / `lr_delay` are set — in a fixed order; each carries
    `names`, the trainable-parameter names it holds (for inspection and logs), its `lr_scale`
    and its `lr_delay`."""
    groups: dict[tuple[str, float, int], tuple[list, list]] = {}
    seen: set[int] = set()
    for name, param in named_params.items():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        key = ("no_decay" if no_decay(name, param, config) else "decay", lr_scale(name, config),
               lr_delay(name, config))
        params, names = groups.setdefault(key, ([], []))
        params.append(param)
        names.append(name)
    return [{"params": params, "names": names, "group": kind, "lr_scale": scale, "lr_delay": delay,
             "weight_decay": config.weight_decay if kind == "decay" else 0.0}
            for (kind, scale, delay), (params, names) in sorted(groups.items(),
                                                                key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2]))]


def build_optimizer(named_params: dict[str, nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    groups = parameter_groups(named_params, config)
    if not groups:
        raise ConfigError("the model has no trainable parameters (optim.lr_scale: 0 for every prefix?)")
    for group in groups:
        group.pop("names")  # keep the optimizer's state_dict plain; see parameter_groups
    # foreach: one multi-tensor update instead of a Python loop per parameter (the CPU default)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, foreach=True)


def learning_rate(step: int, base_lr: float, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup reaching `base_lr` at update
    warmup_steps - 1 (the first update uses base_lr / warmup_steps, never 0), then constant or a
    cosine or linear decay to min_lr_ratio * base_lr at the last update."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return base_lr
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = schedule.min_lr_ratio
    if schedule.kind == "linear":
        return base_lr * (floor + (1 - floor) * (1 - progress))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, step: int = 0, warmup_steps: int = 0) -> None:
    """Sets each group's learning rate for update `step`: `lr` times the group's `lr_scale`, 0
    while `step` < its `lr_delay`, then warmed up linearly over `warmup_steps` updates."""
    for group in optimizer.param_groups:
        delay = group.get("lr_delay", 0)
        ramp = 1.0
        if delay:
            ramp = 0.0 if step < delay else min(1.0, (step - delay + 1) / max(1, warmup_steps))
        group["lr"] = lr * group.get("lr_scale", 1.0) * ramp


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float,
                   process_group: object | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients (clipped to `max_norm` when > 0); a float32 tensor.

    Works for plain and DDP parameters (torch's own `clip_grad_norm_`) and for FSDP2's sharded
    DTensor parameters mixed with the replicated ones FSDP2 cannot shard (the 0-dim gates): the
    squared norms of the local shards are summed over ranks, the replicated ones counted once.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf).float()

    import torch.distributed as dist

    sharded = [p.grad.to_local() for p in params if isinstance(p.grad, DTensor)]
    replicated = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    device = sharded[0].device

    def sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in grads]).sum().to(device)

    local = sq(sharded)
    dist.all_reduce(local, group=process_group)
    total = (local + sq(replicated)).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in sharded + replicated:
            g.mul_(coef.to(g.dtype))
    return total
