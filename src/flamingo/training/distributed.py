"""Process groups, devices and model wrapping (DDP, FSDP2) for `torchrun` runs.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) runs unwrapped. Under torchrun:

- ddp: `DistributedDataParallel`; only the trainable parameters are registered (the frozen
  backbones are neither broadcast nor bucketed), gradient sync only on the last backward of an
  update (`no_sync` for the others).
- fsdp: FSDP2 `fully_shard` on every decoder block (the frozen LM block together with its GATED
  XATTN-DENSE layer), on the vision encoder, on the resampler and on the root (embeddings, head):
  frozen and trainable weights, gradients and optimizer state are sharded; trainable and frozen
  parameters may share a unit (FSDP2 shards per parameter). FSDP2 cannot shard 0-dim parameters,
  so the tanh gates stay replicated outside FSDP and their gradients are all-reduced here
  (`sync_replicated_grads`).

Gradients are averaged over ranks by both wrappers; the trainer scales its per-rank objective by
the world size so that the result is the gradient of the global objective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flamingo.model.config import ConfigError
from flamingo.model.flamingo import Flamingo
from flamingo.model.language_model import find_decoder_layers
from flamingo.training.config import TrainConfig


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # none | ddp | fsdp
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(config: TrainConfig) -> Runtime:
    """Read torchrun's environment, pick the device, start the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    want = config.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train config field device: cuda was asked for but torch sees no CUDA device "
                          "(use device: auto or cpu)")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    runtime = Runtime(rank, world, local_rank, local_world, device)
    if world > 1:
        runtime.strategy = config.distributed.strategy
        if not dist.is_initialized():
            backend = config.distributed.backend or ("nccl" if use_cuda else "gloo")
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=config.distributed.timeout_minutes),
                                    **({"device_id": device} if use_cuda else {}))
            runtime.owns_process_group = True
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                               f"the environment (RANK={rank}, WORLD_SIZE={world})")
    threads = config.threads
    if threads is None and not use_cuda and local_world > 1:
        threads = max(1, (os.cpu_count() or 1) // local_world)
    if threads is not None:
        torch.set_num_threads(threads)
    return runtime


def shutdown(runtime: Runtime) -> None:
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ wrapping
def replicated_params(model: Flamingo) -> list[nn.Parameter]:
    """Trainable parameters FSDP2 leaves replicated (0-dim: the tanh gates)."""
    return [p for p in model.parameters() if p.ndim == 0]


def wrap_model(model: Flamingo, runtime: Runtime, config: TrainConfig) -> nn.Module:
    """The module to call in training (the model itself in a single process)."""
    if runtime.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        ignore = [n for n, p in model.named_parameters() if id(p) not in trainable]
        ignore += [n for n, _ in model.named_buffers()]
        # Frozen weights and buffers are identical on every rank (built from the same files): DDP
        # neither broadcasts nor buckets them.
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                   find_unused_parameters=config.distributed.find_unused_parameters)
    if runtime.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Every rank built the same initial weights (same seed, same files): FSDP2 shards the local
        # copies without broadcasting.
        ignored = set(replicated_params(model))
        _, layers = find_decoder_layers(model.lm, model.decoder_layers_path)
        for layer in layers:
            fully_shard(layer, ignored_params=ignored)
        if model.vision_encoder is not None:
            fully_shard(model.vision_encoder, ignored_params=ignored)
        fully_shard(model.perceiver, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        return model
    return model


def unwrap(module: nn.Module) -> Flamingo:
    return module.module if hasattr(module, "module") and isinstance(module.module, Flamingo) else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, runtime: Runtime, sync: bool) -> Iterator[None]:
    """Around one forward+backward: all-reduce/reduce-scatter gradients only when `sync`."""
    if runtime.strategy == "ddp" and not sync:
        with module.no_sync():
            yield
        return
    if runtime.strategy == "fsdp":
        module.set_requires_gradient_sync(sync)
    yield


def sync_replicated_grads(model: Flamingo, runtime: Runtime) -> None:
    """FSDP2: average the gradients of the parameters it leaves replicated."""
    if runtime.strategy != "fsdp":
        return
    params = [p for p in replicated_params(model) if p.requires_grad]
    grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    dist.all_reduce(grads)
    grads /= runtime.world_size
    for p, g in zip(params, grads):
        p.grad = g.clone()


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective for DTensors."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor
