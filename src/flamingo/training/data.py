"""What the trainer needs from data, and THE place where training datasets meet the pipeline.

The trainer consumes, per dataset, a `BatchSource`: an iterable of `flamingo.data.batch.Batch`
(for this rank) that can report and restore its position. `build_sources` makes one per entry of
the config's `datasets:` list:

- kind "synthetic_shapes" / "procedural" / "clipart": `flamingo.data.synthetic.ShapesSource` /
  `ProceduralSource` / `ClipartSource` (generated in memory; clipart reads the installed clip-art);
- kind "task": `flamingo.training.task_source.TaskSource` (a benchmark's annotations, as `flamingo
  eval` reads them, in its prompt format: fine-tuning);
- kind "dialogue": `flamingo.training.dialogue.DialogueSource` (chats about generated images in the
  dialogue format the chat path serves, loss on the assistant turns);
- any other kind: the data pipeline's `flamingo.data.loader.build_loader`, given the entry as its
  `DatasetConfig` (name, kind, weight, batch_size and all other keys of the entry map one to
  one onto its fields), the model's tokenizer, special-token ids and image processor, the run's
  seed, this rank and the world size. `pipeline_source` is the only code that knows that API.

A model of another family (`flamingo.model.families`: IDEFICS, Llama 3.2 Vision) trains on `kind:
task` and `kind: pairs` datasets, which write its samples as its processor does
(`flamingo.data.processing.FamilyInputs`); any other kind is refused (`check_family`, naming what that
family's data needs): those sources build our prompts (a bare media token per image, the paper's
`<|endofchunk|>` before each image of a document) and one square picture per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from flamingo.data.batch import Batch
from flamingo.data.config import DatasetConfig
from flamingo.data.loader import build_loader
from flamingo.data.processing import FamilyInputs
from flamingo.errors import UserError
from flamingo.model.config import ConfigError
from flamingo.model.families import FAMILIES
from flamingo.model.flamingo import Flamingo
from flamingo.training.config import DatasetSpec, TrainConfig
from flamingo.training.dialogue import dialogue_source
from flamingo.training.task_source import task_source

SYNTHETIC_KINDS = ("synthetic_shapes", "procedural", "clipart")
TASK_KIND = "task"  # a benchmark's annotations in the evaluation's prompt format (flamingo.training.finetune)
DIALOGUE_KIND = "dialogue"  # chats about generated images in the served dialogue format (flamingo.training.dialogue)


@runtime_checkable
class BatchSource(Protocol):
    """One dataset's batches for one rank.

    Iterating yields Batches from the current position on; `state_dict()` taken between two
    batches describes the position right after the last batch yielded (so a source restored
    with `load_state_dict` and iterated again yields what the original would have yielded
    next). States must hold only plain Python values and tensors (they are saved in
    checkpoints and read back with `torch.load(weights_only=True)`).
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _image_processor(model: Flamingo, spec: DatasetSpec) -> Any:
    if model.vision_encoder is None:
        raise ConfigError(f"dataset {spec.name!r}: the model has no vision encoder (it is fed precomputed "
                          f"features), so images cannot be preprocessed for it")
    return model.vision_encoder.image_processor()


def synthetic_source(spec: DatasetSpec, model: Flamingo, seed: int, rank: int, world_size: int) -> BatchSource:
    from flamingo.data.synthetic import OPTIONS, ClipartSource, ProceduralSource, ShapesSource

    unknown = sorted(set(spec.options) - set(OPTIONS[spec.kind]), key=str)
    if unknown:
        raise ConfigError(f"dataset {spec.name!r} (kind {spec.kind}): unknown field(s) {unknown}; "
                          f"expected some of {['name', 'kind', 'weight', 'batch_size', *OPTIONS[spec.kind]]}")
    source = {"synthetic_shapes": ShapesSource, "procedural": ProceduralSource, "clipart": ClipartSource}[spec.kind]
    return source(spec.name, model.tokenizer, model.media_token_id, model.eoc_token_id,
                  _image_processor(model, spec), spec.batch_size, seed=seed, rank=rank,
                  world_size=world_size, **spec.options)


def pipeline_source(spec: DatasetSpec, model: Flamingo, seed: int, rank: int, world_size: int) -> BatchSource:
    """THE integration point with the data pipeline (flamingo.data)."""
    dataset_config = DatasetConfig.from_dict(spec.to_dict())
    # A model of another family takes its own inputs (pairs only: check_family).
    family = FamilyInputs(model) if getattr(model, "family", None) else None
    # The position is restored by the trainer through load_state_dict, so every loader starts at 0.
    return build_loader(dataset_config, model.tokenizer, model.media_token_id, model.eoc_token_id,
                        None if family else _image_processor(model, spec), seed=seed, rank=rank,
                        world_size=world_size, start_position=0, family=family)


def build_source(spec: DatasetSpec, model: Flamingo, seed: int, rank: int, world_size: int) -> BatchSource:
    if spec.kind == TASK_KIND:
        processor = None if getattr(model, "family", None) else _image_processor(model, spec)
        return task_source(spec, model, processor, seed, rank, world_size)
    if spec.kind == DIALOGUE_KIND:
        return dialogue_source(spec, model, _image_processor(model, spec), seed, rank, world_size)
    make = synthetic_source if spec.kind in SYNTHETIC_KINDS else pipeline_source
    return make(spec, model, seed, rank, world_size)


# What a model of another family (`flamingo.model.families`) needs from its training data.
FAMILY_DATA = {
    "mllama": "a Llama 3.2 Vision model takes each image as aspect-ratio tiles (pixel_values per tile, "
              "aspect_ratio_ids, aspect_ratio_mask) and its prompts with BOS after the leading images",
    "idefics": "an IDEFICS model takes each image as <fake_token_around_image><image><fake_token_around_image> "
               "in its prompts, as its processor writes them",
}


# The dataset kinds that write a family's own inputs (`FamilyInputs`): a benchmark's records, image-text pairs.
FAMILY_KINDS = (TASK_KIND, "pairs")


def check_family(family: str | None, config: TrainConfig) -> None:
    """Refuse, for a model of another family (`model.family`, or a converted directory's
    `converted_family`; None: one of ours), a dataset whose kind cannot write its inputs (any but
    `FAMILY_KINDS`), naming what they would need."""
    if family is None:
        return
    other = [f"{spec.name!r} (kind {spec.kind})" for spec in config.datasets if spec.kind not in FAMILY_KINDS]
    if other:
        need = FAMILY_DATA.get(family, f"a {family} model takes its inputs in its family's own format")
        raise UserError(f"training a {FAMILIES.get(family, family)} model: dataset(s) {', '.join(other)} cannot "
                        f"be used: {need}, but that kind of data builds our prompts (a bare media token per image) "
                        f"and one square picture per image; use kind: task (flamingo finetune) or pairs datasets, "
                        f"which write the family's own inputs")


def build_sources(config: TrainConfig, model: Flamingo, rank: int = 0, world_size: int = 1) -> dict[str, BatchSource]:
    check_family(getattr(model, "family", None), config)
    return {spec.name: build_source(spec, model, config.seed, rank, world_size) for spec in config.datasets}
