"""Data: readers for interleaved documents, image-text and video-text pairs (WebDataset shards,
folders, JSONL), the paper's processing, and deterministic, resumable batching; the benchmarks'
samples and task formats (`benchmarks`, read by evaluation and fine-tuning alike); and the
generated data, all here: shapes (`shapes`), procedural scenes and episodes (`procedural`), real
drawn objects (`clipart`), the offline tasks' episodes (`episodes`) and the in-memory training
sources over them (`synthetic`), every stream keyed by `sources.keyed_rng`.

    from flamingo.data import DatasetConfig, build_loader
    loader = build_loader(DatasetConfig(name="m3w", kind="interleaved", path="shards/*.tar"),
                          model.tokenizer, model.media_token_id, model.eoc_token_id,
                          model.vision_encoder.image_processor(), seed=0, rank=0, world_size=1)
    for batch in loader: ...                      # flamingo.data.batch.Batch
    state = loader.state_dict()                   # position + counters, to save with a checkpoint
"""

from flamingo.data.batch import IGNORE_INDEX, Batch, TrainingSample, collate
from flamingo.data.config import DataError, DatasetConfig
from flamingo.data.loader import DataStats, FlamingoLoader, build_loader
from flamingo.data.shapes import ShapesDataset, make_shapes_dataset

__all__ = [
    "IGNORE_INDEX", "Batch", "TrainingSample", "collate", "DataError", "DatasetConfig", "DataStats",
    "FlamingoLoader", "build_loader",
    "ShapesDataset", "make_shapes_dataset",
]
