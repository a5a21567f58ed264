"""The training loop (paper section 2.4 and appendix B.1.2).

Objective: sum_m lambda_m * L_m, where L_m is the mean negative log-likelihood of the labelled
tokens of dataset m in the update (all micro-batches, all ranks). By default every update takes
`accumulation` micro-batches of *every* dataset and accumulates all their gradients (the paper's
choice); `objective: round_robin` uses one dataset per update in turn (the paper's ablation, with
the same lambda weights).

Each micro-batch contributes lambda_m * sum(token NLL) / N_m to the backward pass, N_m being the
global token count of dataset m in the update (all-reduced before the forward passes), so the
update is the same for any split of the same samples over ranks and micro-batches: 2 ranks with
batch 2 = 1 process with batch 4 = 1 process with batch 2 and accumulation 2.

With a `lora:` section, LoRA adapters (flamingo.model.lora) train beside the bridge and are saved
in PEFT's format next to its weights in every checkpoint and in the final model directory.

An update whose loss or gradient norm is not finite is skipped (no optimizer step) and counted;
`max_nonfinite_in_a_row` consecutive ones stop the run with a `TrainingError`.

Resuming (`resume="auto"` or a checkpoint path) restores trainable weights, optimizer state,
step, data positions, RNG states and LoRA adapters, so a run killed at any point and resumed from its last
checkpoint ends with the same weights as a run never interrupted (bit-exact on CPU in a single
process; under DDP/FSDP up to the nondeterminism of collectives).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flamingo.config_io import short
from flamingo.data.batch import Batch
from flamingo.errors import UserError
from flamingo.model.config import ConfigError, FlamingoConfig
from flamingo.model.families import FAMILIES, converted_family, copy_family_files, load_converted
from flamingo.model.flamingo import Flamingo
from flamingo.model.lora import (
    apply_lora,
    has_adapters,
    load_adapter_weights,
    lora_parameters,
    lora_state_dict,
    write_adapters,
)
from flamingo.model.weights import (
    WEIGHTS_FILE,
    load_trainable_weights,
    load_weights_file,
    weights_digest,
    write_model_files,
)
from flamingo.outputs import check_writable, publish, staging_dir, write_text_atomic
from flamingo.training import checkpoint as ckpt
from flamingo.training.activation_checkpointing import enable_gradient_checkpointing
from flamingo.training.config import TrainConfig
from flamingo.training.data import BatchSource, build_sources, check_family
from flamingo.training.stop_signals import StopSignals
from flamingo.training.distributed import (
    all_reduce_sum,
    barrier,
    full_tensor,
    gather_objects,
    gradient_sync,
    init_runtime,
    shutdown,
    sync_replicated_grads,
    unwrap,
    wrap_model,
)
from flamingo.training.metrics import MetricsLogger, gate_values
from flamingo.training.optim import build_optimizer, clip_grad_norm, learning_rate, set_learning_rate

FINAL_DIR = "final"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps being non-finite); the message says why."""


@dataclass
class StepResult:
    step: int  # updates completed after this one
    loss: float  # sum_m lambda_m * loss_m (nan when skipped for a non-finite loss)
    losses: dict[str, float]
    grad_norm: float
    lr: float
    input_tokens: int  # non-padding tokens processed, all ranks
    target_tokens: int  # labelled tokens, all ranks
    skipped: bool
    seconds: float


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    skipped_steps: int
    history: list[StepResult]  # the updates run by this call (not those before a resume)
    records: list[dict[str, Any]]  # the metrics records logged by this call (main process)
    last_checkpoint: Path | None
    final_dir: Path | None
    model: Flamingo
    stopped_early: str | None = None  # why the run ended before `steps` (a finite dataset ended, a signal)
    interrupted_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped it (checkpoint saved)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX, as oneDNN reports it); where it
    does not, bf16 autocast on the CPU is emulated and far slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `fit()` trains.

    model / sources: inject a built model or data sources (tests, notebooks); by default the
    model is built from `config.model` (seeded with `config.seed`) and the sources from
    `config.datasets` (see `flamingo.training.data`).
    resume: None (a fresh run; refused when the checkpoint directory already holds checkpoints),
    "auto" (the latest checkpoint when there is one, else fresh) or a checkpoint folder.
    trust_remote_code: let a language model that needs its own code (`lm.trust_remote_code`) run it.
    base_spec: how the user named the `init_from` model (e.g. "embedded"), recorded with the hash
    of its weights in RUN_DIR/final/provenance.json (default: the `init_from` path).
    """

    def __init__(self, config: TrainConfig, *, resume: str | Path | None = None, model: Flamingo | None = None,
                 sources: dict[str, BatchSource] | None = None, trust_remote_code: bool = False,
                 base_spec: str | None = None) -> None:
        self.config = config
        self.runtime = init_runtime(config)
        try:
            self._build(config, resume, model, sources, trust_remote_code, base_spec)
        except BaseException:
            shutdown(self.runtime)
            raise

    def _build(self, config: TrainConfig, resume: str | Path | None, model: Flamingo | None,
               sources: dict[str, BatchSource] | None, trust_remote_code: bool, base_spec: str | None) -> None:
        rt = self.runtime
        self.run_dir = Path(config.run_dir or "runs/flamingo")
        self.checkpoint_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else self.run_dir / "checkpoints"
        for where, folder in (("run_dir", self.run_dir), ("checkpoint.dir", self.checkpoint_dir)):
            check_writable(folder, where, folder=True)  # now, not after building the model
        resume_from = self._resolve_resume(resume)

        # A converted model of another family (flamingo convert) is built from its directory, and its
        # frozen backbones go with the final model (`save_final`).
        self.family_base = Path(config.init_from) if config.init_from and converted_family(config.init_from) \
            else None
        check_family(converted_family(self.family_base) if self.family_base else getattr(model, "family", None),
                     config)  # before the model is built
        if model is None and self.family_base is not None:
            model = converted_model(config)
        elif model is None:
            from flamingo.model.weights import build_flamingo

            torch.manual_seed(config.seed)  # the same fresh bridge on every rank
            model = build_flamingo(config.model, trust_remote_code=trust_remote_code)
        self.model = model
        resume_state = None
        self.provenance: dict[str, Any] | None = None
        if config.init_from:  # read on resume too: the final model records what it started from
            path = Path(config.init_from)
            path = path / WEIGHTS_FILE if path.is_dir() else path
            base = load_weights_file(path)
            self.provenance = {"base": {"spec": base_spec or config.init_from, "directory": str(config.init_from),
                                        "weights_sha256": weights_digest(base)}}
            if has_adapters(path.parent):
                raise ConfigError(f"init_from: {config.init_from} holds LoRA adapters, which a run does not start "
                                  f"from; fold them into a plain model directory first: flamingo merge-lora "
                                  f"{config.init_from} OUT, then start from OUT")
        if config.lora is not None:
            with torch.random.fork_rng():  # the same adapters on every rank, whatever ran before
                torch.manual_seed(config.seed)
                apply_lora(model, config.lora)
        if resume_from is not None:
            tensors, resume_state = ckpt.load_checkpoint(resume_from)
            load_trainable_weights(model, tensors, source=str(resume_from))
            if config.lora is not None:
                load_adapter_weights(model, resume_from)
            elif has_adapters(resume_from):
                raise ConfigError(f"checkpoint {resume_from} holds LoRA adapters but the config has no lora "
                                  f"section: resume with the lora settings it was trained with")
        elif config.init_from:
            # A bridge-only model may start a run that unfreezes backbone parts (fine-tuning).
            load_trainable_weights(model, base, source=str(path), backbone_defaults=True)
        self.resumed_from = resume_from

        self._setup_precision(model)
        if config.precision == "bf16" and rt.device.type == "cpu" and rt.is_main and not cpu_has_native_bf16():
            print("flamingo train: warning: precision bf16 on a CPU without native bf16 instructions (oneDNN "
                  f"reports none; torch sees {torch.backends.cpu.get_cpu_capability()}): bf16 is emulated there, "
                  "~20x slower than fp32 (configs/embedded/train.yaml: 90 s vs 4 s an update on an AVX2 CPU); "
                  "use precision: fp32", file=sys.stderr)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.to(rt.device)
        model.train()
        self.module = wrap_model(model, rt, config)
        wrapped = unwrap(self.module)
        self.optimizer = build_optimizer({**wrapped.trainable_state_dict(),
                                          **{f"lora.{n}": p for n, p in lora_parameters(wrapped).items()}},
                                         config.optim)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

        self.sources = sources if sources is not None else build_sources(config, model, rt.rank, rt.world_size)
        missing = [d.name for d in config.datasets if d.name not in self.sources]
        if missing:
            raise ConfigError(f"no data source for dataset(s) {missing}")
        self.weights = config.weights
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.stop_signals = StopSignals("train", announce=rt.is_main)  # acted on between updates
        self.stop_agreed = False  # every rank knows of a signal: stop after the current update
        self.tokens_seen = 0
        if resume_state is not None:
            self._restore(resume_state)
        else:
            random.seed(config.seed + rt.rank)
            np.random.seed((config.seed + rt.rank) % 2**32)
        self._iterators: dict[str, Iterator[Batch]] = {}
        self.last_checkpoint: Path | None = resume_from

    # ------------------------------------------------------------------------------- set-up
    def _resolve_resume(self, resume: str | Path | None) -> Path | None:
        return ckpt.resolve_resume(self.checkpoint_dir, resume)

    def _frozen_dtype(self) -> torch.dtype | None:
        choice = self.config.frozen_dtype
        if choice == "float32":
            return torch.float32
        if choice == "bfloat16":
            return torch.bfloat16
        device = self.runtime.device
        if self.config.precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # keep the dtype the backbones were loaded in (lm.dtype)

    def _setup_precision(self, model: Flamingo) -> None:
        """Trainable weights in fp32 (they and the optimizer state stay fp32 in bf16 training);
        frozen weights stored in `frozen_dtype`."""
        frozen = self._frozen_dtype()
        seen: set[int] = set()
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad:
                if param.dtype != torch.float32:
                    param.data = param.data.float()
            elif frozen is not None and param.is_floating_point() and param.dtype != frozen:
                param.data = param.data.to(frozen)
        if frozen is not None:
            # Batch-norm statistics must match their layer's weights (other buffers, such as
            # rotary frequencies, stay in the precision their model computes them in).
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.weight is not None \
                        and not module.weight.requires_grad:
                    for name in ("running_mean", "running_var"):
                        buffer = getattr(module, name)
                        if buffer is not None:
                            setattr(module, name, buffer.to(module.weight.dtype))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.runtime.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------- one update
    def _iterator(self, name: str) -> Iterator[Batch]:
        if name not in self._iterators:
            self._iterators[name] = iter(self.sources[name])
        return self._iterators[name]

    def datasets_for(self, step: int) -> list[str]:
        names = [d.name for d in self.config.datasets]
        return [names[step % len(names)]] if self.config.objective == "round_robin" else names

    def train_step(self) -> StepResult | None:
        """One optimizer update (or a skipped one); None when a finite dataset has run out."""
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        names = self.datasets_for(self.step)
        micro: dict[str, list[Batch]] = {}
        exhausted = 0.0
        for name in names:
            batches = []
            for _ in range(cfg.accumulation):
                batch = next(self._iterator(name), None)
                if batch is None:
                    exhausted = 1.0
                    break
                batches.append(batch)
            micro[name] = batches
        # One collective for the token counts and a flag, so every rank stops at the same update
        # when a dataset ran out somewhere.
        counts = torch.tensor([float(sum(b.num_tokens for b in micro[n])) for n in names] + [exhausted],
                              dtype=torch.float64)
        all_reduce_sum(counts, rt)
        if counts[-1] > 0:
            return None
        target_counts = counts[:-1]

        lr = learning_rate(self.step, cfg.optim.lr, cfg.schedule, cfg.steps)
        passes = sum(len(micro[n]) for n in names)
        done = 0
        nll_sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # per dataset, input tokens, stop flag
        for j, name in enumerate(names):
            # d/dtheta of lambda_m * sum(NLL) / N_m; DDP/FSDP average over ranks, hence * world size.
            scale = self.weights[name] * rt.world_size / max(float(target_counts[j]), 1.0)
            for batch in micro[name]:
                done += 1
                batch = batch.to(rt.device)
                nll_sums[-2] += float(batch.attention_mask.sum())
                with gradient_sync(self.module, rt, sync=done == passes):
                    with self.autocast():
                        # The summed NLL of the labelled tokens, without materialising their logits.
                        nll = self.module(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                                          num_media=batch.num_media, attend_next=batch.attend_next,
                                          labels=batch.labels, vision_inputs=batch.vision_inputs or None).nll_sum
                    (nll * scale).backward()
                nll_sums[j] += float(nll.detach())
        sync_replicated_grads(unwrap(self.module), rt)
        # Whether some rank got SIGTERM/SIGINT rides on this collective: every rank then stops after
        # this update, before drawing the next one's batches (the checkpoint's data positions must
        # be those of the batches actually trained on).
        nll_sums[-1] = 1.0 if self.stop_signals.received else 0.0
        all_reduce_sum(nll_sums, rt)
        if nll_sums[-1] > 0:
            self.stop_signals.received = self.stop_signals.received or "a signal on another rank"
            self.stop_agreed = True
        losses = {n: float(nll_sums[j] / max(float(target_counts[j]), 1.0)) for j, n in enumerate(names)}
        loss = sum(self.weights[n] * v for n, v in losses.items())

        grad_norm = math.nan
        ok = math.isfinite(loss)
        if ok:
            grad_norm = float(clip_grad_norm(self.params, cfg.optim.grad_clip))
            ok = math.isfinite(grad_norm)
        if ok:
            set_learning_rate(self.optimizer, lr, self.step, cfg.schedule.warmup_steps)
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        input_tokens = int(nll_sums[-2])
        self.tokens_seen += input_tokens
        return StepResult(self.step, loss if ok else math.nan, losses, grad_norm, lr, input_tokens,
                          int(target_counts.sum()), not ok, time.perf_counter() - started)

    # ------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg, rt = self.config, self.runtime
        main = rt.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "train_config.yaml", cfg.to_yaml())
        logger = MetricsLogger(self.run_dir, enabled=main, tensorboard=cfg.logging.tensorboard,
                               resume_step=self.step if self.resumed_from is not None else None)
        progress = None
        if main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        history: list[StepResult] = []
        records: list[dict[str, Any]] = []
        interval: list[StepResult] = []
        started = time.perf_counter()
        stopped_early = None
        saved_at = self.step if self.resumed_from is not None else -1
        final_dir = None
        with self.stop_signals:
            try:
                while self.step < cfg.steps:
                    result = self.train_step()
                    if result is None:
                        stopped_early = f"a dataset ran out of data after {self.step} updates"
                        if main:
                            print(f"flamingo train: {stopped_early}; stopping", file=sys.stderr)
                        break
                    history.append(result)
                    interval.append(result)
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{result.loss:.4f}",
                                             tok_s=f"{result.input_tokens / result.seconds:.0f}",
                                             lr=f"{result.lr:.2e}", refresh=False)
                    if self.step % cfg.logging.every == 0 or self.step == cfg.steps or \
                            self.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        record = self._record(interval, time.perf_counter() - started)
                        logger.log(record)
                        records.append(record)
                        interval = []
                    if self.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        first = self.step - self.nonfinite_in_a_row + 1
                        raise TrainingError(
                            f"stopping at step {self.step}: the loss or gradient norm was not finite in "
                            f"{self.nonfinite_in_a_row} consecutive updates (steps {first}-{self.step}, all skipped; "
                            f"{self.skipped_steps} skipped in all). Latest checkpoint: "
                            f"{self.last_checkpoint or 'none'}. Check the data, lower optim.lr, use precision: fp32, "
                            f"or raise max_nonfinite_in_a_row.")
                    if self.step % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                        saved_at = self.step
                    if self.stop_agreed and self.step < cfg.steps:
                        stopped_early = f"stopped by {self.stop_signals.received} after {self.step} updates"
                        if main:
                            print(f"flamingo train: {stopped_early}; stopping", file=sys.stderr)
                        break
                if interval:
                    record = self._record(interval, time.perf_counter() - started)
                    logger.log(record)
                    records.append(record)
                if self.step > 0 and self.nonfinite_in_a_row >= self.step:
                    # A run shorter than max_nonfinite_in_a_row whose every update was skipped
                    # learned nothing: no final model that looks trained.
                    raise TrainingError(
                        f"every update of the run ({self.step}) had a non-finite loss or gradient norm and was "
                        f"skipped: nothing was trained, so no model is saved. Check the data and the base "
                        f"model's weights, lower optim.lr, or use precision: fp32.")
                if saved_at != self.step:
                    self.save_checkpoint()
                # A signal during the last update stops nothing: the run is finished. Otherwise a stopped
                # run is not, and --resume finishes it.
                interrupted_by = self.stop_signals.received if self.stop_agreed and self.step < cfg.steps else None
                if interrupted_by is None:
                    final_dir = self.save_final()
            finally:
                if progress is not None:
                    progress.close()
                logger.close()
        return TrainResult(self.run_dir, self.step, self.skipped_steps, history, records, self.last_checkpoint,
                           final_dir, unwrap(self.module), stopped_early, interrupted_by)

    def _record(self, interval: list[StepResult], elapsed: float) -> dict[str, Any]:
        finite = [r for r in interval if not r.skipped]
        names = [d.name for d in self.config.datasets]

        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else math.nan

        seconds = sum(r.seconds for r in interval)
        record: dict[str, Any] = {
            "step": self.step,
            "time": round(elapsed, 3),
            "loss": mean([r.loss for r in finite]),
            "losses": {n: mean([r.losses[n] for r in finite if n in r.losses]) for n in names},
            "lr": interval[-1].lr,
            "grad_norm": mean([r.grad_norm for r in finite]),
            "tokens": sum(r.input_tokens for r in interval),
            "tokens_per_s": sum(r.input_tokens for r in interval) / seconds if seconds > 0 else math.nan,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "gates": gate_values(unwrap(self.module)),
        }
        data_stats = {n: s.stats.as_dict() for n, s in self.sources.items()
                      if hasattr(getattr(s, "stats", None), "as_dict")}
        if data_stats:  # the data pipeline's counters of this (main) rank: records read, skipped by reason
            record["data"] = {n: {"records": d.get("records"), "samples": d.get("samples"),
                                  "skipped": d.get("skipped")} for n, d in data_stats.items()}
        return record

    # ---------------------------------------------------------------------------- checkpoints
    def _param_names(self) -> list[str]:
        """Model-relative names of the optimizer's parameters, in its order."""
        names = {id(p): n for n, p in unwrap(self.module).named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer state keyed by parameter name, with whole (unsharded) tensors: the same
        format for one process, DDP and FSDP, so a run may resume under another strategy."""
        if not self.optimizer.state:
            return None  # nothing stepped yet (also keeps DCP from initialising the state)
        if self.runtime.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.module, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = self.optimizer.state_dict()
        names = self._param_names()
        return {"state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.runtime.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        index = {name: i for i, name in enumerate(self._param_names())}
        saved = [n for g in state["param_groups"] for n in g["params"]]
        if sorted(saved) != sorted(index):
            raise ConfigError(f"checkpoint {self.resumed_from}: its optimizer state is for other parameters "
                              f"({len(saved)} saved, {len(index)} here)")
        self.optimizer.load_state_dict({
            "state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]],
        })

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the run (a collective: every rank must call it); returns the folder."""
        rt = self.runtime
        model = unwrap(self.module)
        tensors, adapters = self._model_tensors(model)
        optimizer_state = self._optimizer_state()
        data_states = gather_objects({n: s.state_dict() for n, s in self.sources.items()}, rt)
        rng_states = gather_objects(ckpt.rng_state(), rt)
        path = None
        if rt.is_main:
            state = {
                "step": self.step,
                "world_size": rt.world_size,
                "strategy": rt.strategy,
                "optimizer": optimizer_state,
                "data": data_states,
                "rng": rng_states,
                "counters": {"skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                             "tokens_seen": self.tokens_seen},
            }
            path = ckpt.save_checkpoint_files(self.checkpoint_dir, self.step,
                                              lambda folder: self._write_model(model, folder, tensors, adapters),
                                              state, self.config.to_yaml(), keep=self.config.checkpoint.keep)
        barrier(rt)
        self.last_checkpoint = path or self.checkpoint_dir / ckpt.checkpoint_name(self.step)
        return self.last_checkpoint

    def _restore(self, state: dict[str, Any]) -> None:
        rt = self.runtime
        if state["world_size"] != rt.world_size:
            raise ConfigError(f"checkpoint {self.resumed_from} was written by {state['world_size']} process(es); "
                              f"resume it with the same number (this run has {rt.world_size})")
        self.step = int(state["step"])
        counters = state.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(counters.get("nonfinite_in_a_row", 0))
        self.tokens_seen = int(counters.get("tokens_seen", 0))
        part = "optimizer"
        try:  # load_checkpoint checked the structure; values can still be damaged
            if state["optimizer"] is not None:
                self._load_optimizer_state(state["optimizer"])
            for name, source in self.sources.items():
                part = f"data position of dataset {name!r}"
                saved = state["data"][rt.rank]
                if name not in saved:
                    raise ConfigError(f"checkpoint {self.resumed_from} has no data position for dataset {name!r} "
                                      f"(it has {short(sorted(saved, key=str))})")
                source.load_state_dict(saved[name])
            part = "random generator states"
            ckpt.set_rng_state(state["rng"][rt.rank])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            if isinstance(err, UserError):
                raise
            raise ckpt.CheckpointLoadError(f"checkpoint {self.resumed_from}: its {part} cannot be restored "
                                           f"({type(err).__name__}: {str(err)[:200]})") from None

    def _model_tensors(self, model: Flamingo) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The whole trainable weights and LoRA adapters (None without) of a model directory; a
        collective under FSDP (the shards are gathered)."""
        tensors = {k: full_tensor(v.detach()) for k, v in model.trainable_state_dict().items()}
        return tensors, lora_state_dict(model) if self.config.lora is not None else None

    def _write_model(self, model: Flamingo, folder: Path, tensors: dict[str, torch.Tensor],
                     adapters: dict[str, torch.Tensor] | None, provenance: dict[str, Any] | None = None) -> None:
        """A model directory's files (config.yaml, bridge.safetensors, the adapters in PEFT's format)."""
        write_model_files(folder, tensors, model.config, provenance)
        if adapters is not None:
            write_adapters(model, folder, adapters)

    def save_final(self) -> Path | None:
        """The trained model as a model directory RUN_DIR/final (config.yaml + bridge.safetensors, and
        provenance.json naming the `init_from` model it started from and how it was trained, which
        its model card README.md shows)."""
        model = unwrap(self.module)
        tensors, adapters = self._model_tensors(model)
        final = None
        if self.runtime.is_main:
            final = self.run_dir / FINAL_DIR
            with staging_dir(final) as staged:
                self._write_model(model, staged, tensors, adapters, {**(self.provenance or {}),
                                                                      "training": self._training_record()})
                if self.family_base is not None:  # its frozen backbones: the base's, linked (not in checkpoints,
                    copy_family_files(self.family_base, staged)  # which resume on the base)
                publish(staged, final)
        barrier(self.runtime)
        return final

    def _training_record(self) -> dict[str, Any]:
        """How the final model was trained, for its provenance.json and model card."""
        cfg = self.config
        return {"steps": self.step, "seed": cfg.seed, "precision": cfg.precision, "accumulation": cfg.accumulation,
                "processes": self.runtime.world_size,
                "datasets": [{"name": d.name, "kind": d.kind, "weight": d.weight, "batch_size": d.batch_size}
                             for d in cfg.datasets],
                "optim": {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay},
                "schedule": {"kind": cfg.schedule.kind, "warmup_steps": cfg.schedule.warmup_steps}}

    def close(self) -> None:
        shutdown(self.runtime)


def converted_model(config: TrainConfig) -> Flamingo:
    """The converted family model at `config.init_from` (`flamingo convert`), with the backbone parts
    `config.model.unfreeze` names trainable; the model section must describe it (its architecture is
    its checkpoint's: only `unfreeze` may differ)."""
    def architecture(model_config: FlamingoConfig) -> dict[str, Any]:
        return {k: v for k, v in model_config.to_dict().items() if k != "unfreeze"}

    from flamingo.model.weights import directory_config

    model = load_converted(config.init_from, unfreeze=config.model.unfreeze,
                           source=directory_config(config.init_from).lm.name_or_path)
    ours, given = architecture(model.config), architecture(config.model)
    differ = sorted(k for k in set(ours) | set(given) if ours.get(k) != given.get(k))
    if differ:
        raise ConfigError(f"model: {', '.join(differ)} differ(s) from the converted "
                          f"{FAMILIES.get(model.family, model.family)} model at init_from {config.init_from}, "
                          f"whose architecture is its checkpoint's (only unfreeze may change): give its "
                          f"config.yaml as the model section")
    return model


def train(config: TrainConfig, *, resume: str | Path | None = None, model: Flamingo | None = None,
          sources: dict[str, BatchSource] | None = None, trust_remote_code: bool = False,
          base_spec: str | None = None) -> TrainResult:
    """Run (or resume) training as `config` says; see `Trainer`. Restores torch's CPU thread
    count afterwards (a config may set `threads`)."""
    threads = torch.get_num_threads()
    trainer = None
    try:
        trainer = Trainer(config, resume=resume, model=model, sources=sources, trust_remote_code=trust_remote_code,
                          base_spec=base_spec)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        torch.set_num_threads(threads)
