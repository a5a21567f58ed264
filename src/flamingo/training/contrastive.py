"""Contrastive pretraining of the vision encoder (paper B.1.3), the step before Flamingo training.

An image tower (any of our vision encoders, its spatial features mean-pooled) and a text tower (any
Hugging Face encoder, e.g. BERT, its token outputs mean-pooled over the attention mask) are each
projected linearly to a shared space and L2-normalised. The loss is CLIP's two terms, summed as in
the paper: softmax cross-entropy of every image against all texts of the batch and of every text
against all images, with a learnable inverse temperature (clamped to [1, max_logit_scale] after
every update, as CLIP does) and label smoothing.

Across ranks the features are all-gathered with gradients (`torch.distributed._functional_collectives.
all_gather_single`, which torch recommends over the deprecated `torch.distributed.nn.functional.all_gather`)
and each rank scores only its own rows against all gathered columns (open_clip's
"local loss"): memory is linear in the global batch, and with DDP averaging the gradients the
update equals that of one process on the concatenated batch.

Data: image-text pairs through the data pipeline (shards, folders, JSONL; the paper's filters,
flips and colour jitter), with the text tower's tokenizer. The pipeline frames a caption as
[media token] caption [end token]; passing the tokenizer's [CLS] and [SEP] (or BOS/EOS) as those
two makes every sample exactly the text tower's own framing. Positions, RNG states, optimizer and
weights are checkpointed atomically, so a resumed run continues exactly.

Outputs in run_dir: metrics.jsonl (and TensorBoard), checkpoints/step-*/, and vision/: the
trained image tower, which `VisionConfig(kind="local", name_or_path=RUN_DIR/vision)` loads as
Flamingo's frozen vision encoder.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.data.config import DatasetConfig
from flamingo.data.loader import FlamingoLoader, build_loader
from flamingo.errors import cannot_load
from flamingo.model.config import ConfigError
from flamingo.model.vision import VisionEncoder, build_vision_encoder, save_vision_encoder
from flamingo.model.tensor_files import safetensors_os_errors, save_tensors
from flamingo.outputs import check_writable, publish, staging_dir
from flamingo.training import checkpoint as ckpt
from flamingo.training.contrastive_config import PretrainConfig
from flamingo.training.distributed import (
    Runtime,
    all_reduce_sum,
    barrier,
    gather_objects,
    gradient_sync,
    init_runtime,
    shutdown,
)
from flamingo.training.metrics import MetricsLogger
from flamingo.training.optim import build_optimizer, clip_grad_norm, learning_rate, set_learning_rate
from flamingo.training.stop_signals import StopSignals

MODEL_FILE = "model.safetensors"
VISION_DIR = "vision"


# ------------------------------------------------------------------------------------ model
class ContrastiveModel(nn.Module):
    """Image tower + text tower, each mean-pooled and projected to `embed_dim`, L2-normalised;
    `logit_scale` is the log of the learnable inverse temperature."""

    def __init__(self, vision: VisionEncoder, text: nn.Module, embed_dim: int, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.vision = vision
        vision.requires_grad_(True)  # the encoders are built frozen for Flamingo; here they learn
        if getattr(text, "pooler", None) is not None:
            text.pooler = None  # BERT's CLS pooler: unused, the paper mean-pools
        self.text = text
        self.image_projection = nn.Linear(vision.feature_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def train(self, mode: bool = True) -> "ContrastiveModel":
        super().train(mode)
        for child in self.vision.children():  # VisionEncoder pins itself to eval mode (frozen use)
            child.train(mode)
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[K, 3, H, W] normalised pixels -> [K, embed_dim] unit vectors."""
        pooled = self.vision.encode(pixels).float().mean(1)  # mean over spatial locations
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[K, L] token ids and mask -> [K, embed_dim] unit vectors."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = attention_mask[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean over the caption's tokens
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, inverse temperature)."""
        return self.encode_images(pixels), self.encode_texts(input_ids, attention_mask), self.logit_scale.exp()


# ------------------------------------------------------------------------------------- loss
@dataclass
class ContrastiveLoss:
    loss: torch.Tensor  # image_to_text + text_to_image (the paper minimises the sum)
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    image_to_text_accuracy: torch.Tensor  # local rows whose best-scoring text is their own caption
    text_to_image_accuracy: torch.Tensor


def gather_with_grad(features: torch.Tensor, world_size: int) -> torch.Tensor:
    """[n, D] per rank -> [world_size * n, D] in rank order; the backward pass sends every rank
    the gradient of its own rows from all ranks' losses."""
    if world_size == 1:
        return features
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single

    # Differentiable: its backward reduce-scatters (sums) the gathered rows' gradients to their ranks.
    return all_gather_single(features, 0, dist.group.WORLD)


def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                     label_smoothing: float = 0.0, rank: int = 0, world_size: int = 1) -> ContrastiveLoss:
    """CLIP's two-term loss of this rank's pairs [n, D] (unit vectors) against the pairs of all
    ranks (equal n on every rank): row i's positive is column rank * n + i."""
    all_images = gather_with_grad(image_embeddings, world_size)
    all_texts = gather_with_grad(text_embeddings, world_size)
    n = image_embeddings.shape[0]
    labels = torch.arange(n, device=image_embeddings.device) + rank * n
    logits_i2t = logit_scale * image_embeddings @ all_texts.T
    logits_t2i = logit_scale * text_embeddings @ all_images.T
    i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing)
    with torch.no_grad():
        i2t_acc = (logits_i2t.argmax(1) == labels).float().mean()
        t2i_acc = (logits_t2i.argmax(1) == labels).float().mean()
    return ContrastiveLoss(i2t + t2i, i2t, t2i, i2t_acc, t2i_acc)


# --------------------------------------------------------------------------------- building
def build_contrastive_model(config: PretrainConfig, trust_remote_code: bool = False) -> tuple[ContrastiveModel, Any]:
    """(model, text tokenizer), seeded with `config.seed` (the same on every rank);
    `trust_remote_code` lets a text tower that needs its own code run it."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(config.seed)
    vision = build_vision_encoder(config.vision)
    text_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if config.text.revision:
        text_kwargs["revision"] = config.text.revision
    try:
        text = AutoModel.from_pretrained(config.text.name_or_path, **text_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(config.text.name_or_path, **text_kwargs)
    except (OSError, ValueError) as err:  # no model there, unreadable files, unknown hub id, needs remote code
        raise cannot_load("text.name_or_path", config.text.name_or_path, err) from None
    positions = getattr(text.config, "max_position_embeddings", None)
    if isinstance(positions, int) and config.text.max_tokens > positions:  # a long caption would index past them
        raise ConfigError(f"pretrain config field text.max_tokens: expected at most the text tower's "
                          f"{positions} positions, got {config.text.max_tokens}")
    torch.manual_seed(config.seed)
    model = ContrastiveModel(vision, text, config.embed_dim, config.init_temperature)
    return model, tokenizer


def make_scratch_text_tower(directory: str | Path, texts: list[str], hidden_size: int = 256, layers: int = 4,
                            heads: int = 4, vocab_size: int = 4000, max_tokens: int = 64, seed: int = 0) -> Path:
    """Write a randomly initialised BERT and a WordPiece tokenizer trained on `texts` into
    `directory` (a `text.name_or_path` for pretraining): the paper trains its language encoder
    from scratch too, and this needs nothing from the hub."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                   show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=max_tokens, pad_token_id=tokenizer.pad_token_id)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def caption_frame(tokenizer: Any, where: str = "text.name_or_path") -> tuple[int, int]:
    """(start, end) token ids that frame a caption for the text tower: [CLS]/[SEP], else BOS/EOS."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None or start == end:
        raise ConfigError(f"{where}: the text tokenizer needs two distinct start and end tokens (CLS and SEP, or "
                          f"BOS and EOS) to frame captions, got start={start}, end={end}")
    return int(start), int(end)


def pair_loader(options: dict[str, Any], tokenizer: Any, image_processor: Any, max_tokens: int, seed: int,
                rank: int = 0, world_size: int = 1) -> FlamingoLoader:
    """The data pipeline's loader of image-text pairs, framed for the text tower (see the module
    docstring). Full batches only: every rank must contribute the same number of pairs."""
    start, end = caption_frame(tokenizer)
    values = {"p_space": 0.0, "drop_last": True, **options, "kind": "pairs", "add_bos": False,
              "max_tokens": max_tokens}
    return build_loader(DatasetConfig.from_dict(values), tokenizer, start, end, image_processor, seed=seed,
                        rank=rank, world_size=world_size)


@torch.no_grad()
def heldout_retrieval(model: ContrastiveModel, loader: FlamingoLoader, max_pairs: int,
                      device: torch.device) -> dict[str, float]:
    """Image->text and text->image recall@1 over held-out pairs; a retrieved item whose caption is
    identical to the query's counts as a hit, and `chance` is the expected recall of a random pick."""
    was_training = model.training
    model.eval()
    images, texts, captions = [], [], []
    keys: dict[tuple[int, ...], int] = {}
    for batch in loader:
        img, txt, _ = model(batch.pixel_values[:, 0, 0].to(device), batch.input_ids.to(device),
                            batch.attention_mask.to(device))
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            key = tuple(i for i, m in zip(ids, mask) if m)
            captions.append(keys.setdefault(key, len(keys)))
        if len(captions) >= max_pairs:
            break
    model.train(was_training)
    image_emb, text_emb = torch.cat(images)[:max_pairs], torch.cat(texts)[:max_pairs]
    caption_ids = torch.tensor(captions[:max_pairs])
    same = caption_ids[:, None] == caption_ids[None, :]
    similarity = image_emb @ text_emb.T
    rows = torch.arange(len(caption_ids))
    return {"i2t_recall": float(same[rows, similarity.argmax(1)].float().mean()),
            "t2i_recall": float(same[rows, similarity.argmax(0)].float().mean()),
            "chance": float(same.float().mean()), "pairs": len(caption_ids)}


# --------------------------------------------------------------------------------- training
@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    skipped_steps: int
    records: list[dict[str, Any]]  # metrics records logged by this call (main process)
    last_checkpoint: Path | None
    vision_dir: Path | None  # the trained tower (main process); None when a signal stopped the run
    model: ContrastiveModel
    stopped_early: str | None = None  # why the run ended before `steps` (a finite dataset ended, a signal)
    interrupted_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped it (checkpoint saved)


def pretrain_vision(config: PretrainConfig, resume: str | Path | None = None,
                    trust_remote_code: bool = False) -> PretrainResult:
    """Run (or resume: "auto" or a checkpoint folder) a contrastive pretraining; see the module
    docstring. Works in one process and under torchrun (DDP)."""
    if config.distributed.strategy != "ddp":
        raise ConfigError(f"pretrain config field distributed.strategy: expected ddp, got "
                          f"{config.distributed.strategy!r} (both towers are trained and replicated)")
    runtime = init_runtime(config)  # type: ignore[arg-type] - reads device, threads, distributed
    try:
        return _pretrain(config, runtime, resume, trust_remote_code)
    finally:
        shutdown(runtime)


def _pretrain(config: PretrainConfig, rt: Runtime, resume: str | Path | None,
              trust_remote_code: bool) -> PretrainResult:
    run_dir = Path(config.run_dir or "runs/pretrain-vision")
    checkpoint_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else run_dir / "checkpoints"
    for where, folder in (("run_dir", run_dir), ("checkpoint.dir", checkpoint_dir)):
        check_writable(folder, where, folder=True)  # now, not after building the towers
    resume_from = ckpt.resolve_resume(checkpoint_dir, resume)
    model, tokenizer = build_contrastive_model(config, trust_remote_code)
    state: dict[str, Any] = {}
    if resume_from is not None:
        tensors, state = ckpt.load_checkpoint(resume_from, MODEL_FILE)
        model.load_state_dict(tensors, strict=True)
    model.to(rt.device).train()
    module: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                     find_unused_parameters=config.distributed.find_unused_parameters)
    named = dict(model.named_parameters())
    optimizer = build_optimizer(named, config.optim)
    params = list(named.values())

    processor = model.vision.image_processor()
    loaders = {spec.name: pair_loader(spec.to_dict(), tokenizer, processor, config.text.max_tokens, config.seed,
                                      rt.rank, rt.world_size) for spec in config.datasets}
    step, skipped = 0, 0
    if resume_from is not None:
        step, skipped = int(state["step"]), int(state["skipped_steps"])
        optimizer.load_state_dict(state["optimizer"])
        if len(state["data"]) != rt.world_size:
            raise ConfigError(f"checkpoint {resume_from} was written by {len(state['data'])} process(es); "
                              f"resume it with as many (got {rt.world_size})")
        for name, loader in loaders.items():
            loader.load_state_dict(state["data"][rt.rank][name])
        ckpt.set_rng_state(state["rng"][rt.rank])
    else:
        torch.manual_seed(config.seed + rt.rank)  # dropout masks differ across ranks
    heldout = None
    if config.heldout is not None and rt.is_main:
        h = config.heldout
        heldout = pair_loader({"name": "heldout", "path": h.path, "batch_size": h.batch_size, "augment": False,
                               "shuffle": False, "epochs": 1, "drop_last": False}, tokenizer, processor,
                              config.text.max_tokens, config.seed)

    logger = MetricsLogger(run_dir, rt.is_main, config.logging.tensorboard,
                           resume_step=step if resume_from is not None else None)
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    records: list[dict[str, Any]] = []
    interval: dict[str, list[float]] = {}
    last_checkpoint = resume_from
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, disable=not (rt.is_main and config.logging.progress_bar),
               desc="pretrain-vision", dynamic_ncols=True)

    def save(at: int) -> Path | None:
        data = gather_objects({name: loader.state_dict() for name, loader in loaders.items()}, rt)
        rng = gather_objects(ckpt.rng_state(), rt)
        path = None
        if rt.is_main:
            tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            saved = {"step": at, "skipped_steps": skipped, "optimizer": optimizer.state_dict(), "data": data,
                     "rng": rng}
            path = ckpt.save_checkpoint_files(
                checkpoint_dir, at, lambda folder: save_tensors(tensors, folder / MODEL_FILE), saved,
                config.to_yaml(), keep=config.checkpoint.keep)
        barrier(rt)
        return path

    def evaluate(at: int) -> None:
        if heldout is not None:
            result = {"step": at, "heldout": heldout_retrieval(model, heldout, config.heldout.max_pairs, rt.device)}
            heldout.seek(0)
            logger.log(result)
            records.append(result)
        barrier(rt)

    stopped_early, interrupted_by, saved_at = None, None, step if resume_from is not None else -1
    with StopSignals("pretrain-vision", announce=rt.is_main) as stop_signals:
        try:
            while step < config.steps:
                # Every batch of the update is drawn first: a finite dataset that ends stops the run
                # before any of it is trained on. The ranks agree on it first (shards of unequal
                # length run out on one rank earlier), or the others would wait in the forward pass.
                batches = [next(iterators[spec.name], None) for spec in config.datasets]
                exhausted = torch.tensor([float(any(batch is None for batch in batches))], device=rt.device)
                if all_reduce_sum(exhausted, rt).item() > 0:
                    stopped_early = f"a dataset ran out of data after {step} updates"
                    break
                lr = learning_rate(step, config.optim.lr, config.schedule, config.steps)
                set_learning_rate(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                values: dict[str, torch.Tensor] = {}
                for index, (spec, batch) in enumerate(zip(config.datasets, batches)):
                    with gradient_sync(module, rt, sync=index == len(config.datasets) - 1), autocast:
                        images, texts, scale = module(batch.pixel_values[:, 0, 0].to(rt.device),
                                                      batch.input_ids.to(rt.device),
                                                      batch.attention_mask.to(rt.device))
                        out = contrastive_loss(images.float(), texts.float(), scale.float(), config.label_smoothing,
                                               rt.rank, rt.world_size)
                        (spec.weight * out.loss).backward()
                    values[f"losses/{spec.name}"] = out.loss.detach()
                    values[f"i2t_accuracy/{spec.name}"] = out.image_to_text_accuracy
                    values[f"t2i_accuracy/{spec.name}"] = out.text_to_image_accuracy
                grad_norm = clip_grad_norm(params, config.optim.grad_clip)
                # Whether some rank got SIGTERM/SIGINT rides on the metrics' all-reduce: every rank
                # then stops after this update, with a checkpoint of it.
                values["stop"] = torch.tensor(1.0 if stop_signals.received else 0.0)
                names = list(values)
                averaged = all_reduce_sum(torch.stack([values[k].float() for k in names]), rt) / rt.world_size
                values = dict(zip(names, averaged.tolist()))
                stop_agreed = values.pop("stop") > 0
                loss = sum(spec.weight * values[f"losses/{spec.name}"] for spec in config.datasets)
                if math.isfinite(loss) and math.isfinite(float(grad_norm)):
                    optimizer.step()
                else:
                    skipped += 1  # a non-finite update is skipped (identically on every rank: values are all-reduced)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(config.max_logit_scale))
                step += 1
                bar.update(1)
                for key, value in {"loss": loss, "grad_norm": float(grad_norm), **values}.items():
                    interval.setdefault(key, []).append(value)
                if step % config.logging.every == 0 or step == config.steps:
                    record = {"step": step, "lr": lr, "temperature": float(1 / model.logit_scale.detach().exp()),
                              "skipped_steps": skipped}
                    for key, seen in interval.items():
                        record[key] = sum(seen) / len(seen)
                    interval = {}
                    logger.log(_nest(record))
                    records.append(_nest(record))
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if step % config.checkpoint.every == 0 or step == config.steps:
                    last_checkpoint, saved_at = save(step), step
                if config.heldout is not None and (step % config.heldout.every == 0 or step == config.steps):
                    evaluate(step)
                if stop_agreed and step < config.steps:
                    interrupted_by = stop_signals.received or "a signal on another rank"
                    stopped_early = f"stopped by {interrupted_by} after {step} updates"
                    break
            if saved_at != step:
                last_checkpoint = save(step)
        finally:
            bar.close()
            logger.close()
    if stopped_early and rt.is_main:
        print(f"flamingo pretrain-vision: {stopped_early}; stopping", file=sys.stderr)
    vision_dir = None
    if rt.is_main and interrupted_by is None:
        vision_dir = run_dir / VISION_DIR
        with staging_dir(vision_dir) as staged, safetensors_os_errors():  # whole or not at all
            save_vision_encoder(model.vision, staged)
            publish(staged, vision_dir)
    barrier(rt)
    return PretrainResult(run_dir, step, skipped, records, last_checkpoint, vision_dir, model, stopped_early,
                          interrupted_by)


def _nest(record: dict[str, Any]) -> dict[str, Any]:
    """{"losses/a": 1.0} -> {"losses": {"a": 1.0}} (the metrics log's shape)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        head, _, tail = key.partition("/")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out
