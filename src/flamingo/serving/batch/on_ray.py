"""`flamingo batch --ray`: the same batch job with Ray Data, across the cores or machines of a Ray
cluster (the ray extra).

Ray Data reads the dataset (a JSONL file with `read_text`, shards with `read_webdataset`, a
folder's images from its listing) and maps batches of records through a pool of actors, each
holding one model and one serving engine (`RecordRunner`: the same checks and answers as
`run_batch`, continuous batching and the prefix cache within each actor). The driver streams the
results into the same `BatchOutput` as a single-process run (`OUT.partial`, resumable, published
at the end) and, when asked, writes them as Parquet files with Ray Data too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo.errors import UserError, import_extra
from flamingo.model.flamingo import Flamingo
from flamingo.serving.batch.records import BatchDefaults, Dataset, RawRecord, folder_records, sample_record
from flamingo.serving.batch.runner import (
    BatchOutput,
    BatchSummary,
    RecordId,
    RecordRunner,
    batch_settings,
    load_engine_model,
    record_key,
    run_records,
)
from flamingo.serving.engine import Engine, EngineConfig
from flamingo.serving.limits import ServerSettings

FEATURE = "flamingo batch --ray"


@dataclass(frozen=True)
class RaySettings:
    actors: int = 1  # one model and engine each
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0
    address: str | None = None  # the cluster to join (None: RAY_ADDRESS, else a local instance)
    parquet: Path | None = None  # also write the results as Parquet files in this folder
    batch_size: int = 64  # records per call of an actor: the engine's batching works within one call


class _Collected:
    """One actor call's results and rejects, as rows for Ray Data (the sink of `run_records`)."""

    def __init__(self, done: set[str]) -> None:
        self.done = done
        self.rows: list[dict[str, str]] = []

    def write(self, result: dict[str, Any]) -> None:
        self.rows.append({"kind": "result", "line": json.dumps(result, ensure_ascii=False)})

    def reject(self, record_id: RecordId | None, where: str, reason: str) -> None:
        self.rows.append({"kind": "reject", "line": json.dumps({"id": record_id, "where": where, "reason": reason},
                                                               ensure_ascii=False)})

    def skip(self) -> None:
        self.rows.append({"kind": "skip", "line": ""})


class EngineActor:
    """A Ray Data actor: one model and engine; each call runs a batch of records through them."""

    def __init__(self, model: Flamingo | str, source_name: str, defaults: BatchDefaults, settings: ServerSettings,
                 engine_config: EngineConfig, done: frozenset[str], device: str = "cpu", quantize: str | None = None,
                 trust_remote_code: bool = False) -> None:
        if isinstance(model, str):
            model = load_engine_model(model, device=device, quantize=quantize, trust_remote_code=trust_remote_code)
        self.runner = RecordRunner(Engine(model, engine_config), settings, defaults)
        self.source_name, self.done = source_name, done

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records = self.records(batch)
        sink = _Collected(set(self.done))
        run_records(self.runner, records, sink)
        return {"kind": [row["kind"] for row in sink.rows], "line": [row["line"] for row in sink.rows]}

    def records(self, batch: dict[str, Any]) -> list[RawRecord]:
        """The batch's rows (columns of read_text, read_webdataset or a folder's listing) as records."""
        if "text" in batch:  # JSONL lines
            return [RawRecord(self.source_name, line=str(line)) for line in batch["text"]]
        if "__key__" in batch:  # WebDataset samples
            columns = [c for c in batch if not c.startswith("__")]
            return [sample_record(f"{Path(str(batch['__url__'][i])).name}:{key}", str(key),
                                  {c: batch[c][i] for c in columns if batch[c][i] is not None})
                    for i, key in enumerate(batch["__key__"])]
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]  # a folder's listing
        return [RawRecord.from_row({**row, "images": json.loads(row["images"])}) for row in rows]


def _read(ray: Any, dataset: Dataset, ray_settings: RaySettings) -> Any:
    # Ray Data hands an actor whole blocks: a JSONL file or a folder's listing is cut into blocks (one a
    # batch, 4 per actor at most, one per actor at least), so that every actor gets some. Reading takes
    # no CPU slot: the actors may hold them all.
    actors, batches = ray_settings.actors, -(-dataset.count // ray_settings.batch_size)
    blocks = max(1, min(dataset.count, max(actors, min(batches, 4 * actors))))
    if dataset.kind == "jsonl":
        return ray.data.read_text(str(dataset.paths[0]), override_num_blocks=blocks, num_cpus=0)
    if dataset.kind == "shards":
        return ray.data.read_webdataset([str(p) for p in dataset.paths], decoder=None, num_cpus=0)
    # a folder: its listing (names only) is the dataset; the actors read the images
    return ray.data.from_items([{**record.as_row(), "images": json.dumps(record.images)}
                                for record in folder_records(dataset.paths[0])], override_num_blocks=blocks)


def run_batch_on_ray(model: Flamingo | str, dataset: Dataset, out: str | Path, ray_settings: RaySettings = RaySettings(),
                     *, defaults: BatchDefaults = BatchDefaults(), settings: ServerSettings | None = None,
                     engine_config: EngineConfig | None = None, device: str = "cpu", quantize: str | None = None,
                     trust_remote_code: bool = False, progress: bool = True) -> BatchSummary:
    """`run_batch` on Ray Data: `model` (a spec each actor loads, or a model object sent to them)
    answers `dataset` in `ray_settings.actors` actors; the same OUT, rejects file and resumption.
    Joins the running Ray instance, else `ray_settings.address`, else starts a local one."""
    ray = import_extra("ray", "ray", FEATURE)
    import_extra("ray.data", "ray", FEATURE)
    from tqdm import tqdm

    parquet = ray_settings.parquet
    if parquet is not None and (parquet.is_file() or (parquet.is_dir() and any(parquet.iterdir()))):
        raise UserError(f"--parquet {parquet}: expected a new or empty folder")
    if not ray.is_initialized():
        ray.init(address=ray_settings.address, log_to_driver=False)
    settings = batch_settings(settings, dataset.media_root)
    engine_config = engine_config or EngineConfig(max_queue=128)
    with BatchOutput(out) as output:
        # (a model object travels in the constructor's arguments, which Ray Data keeps in its object store)
        kwargs = dict(model=model, source_name=dataset.paths[0].name, defaults=defaults, settings=settings,
                      engine_config=engine_config, done=frozenset(output.done), device=device, quantize=quantize,
                      trust_remote_code=trust_remote_code)
        results = _read(ray, dataset, ray_settings).map_batches(
            EngineActor, fn_constructor_kwargs=kwargs, batch_size=ray_settings.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=ray_settings.actors), num_cpus=ray_settings.cpus_per_actor,
            num_gpus=ray_settings.gpus_per_actor or None)
        written: set[str] = set()
        with tqdm(total=max(0, dataset.count - len(output.done)), unit="rec", disable=not progress,
                  dynamic_ncols=True, smoothing=0.1) as bar:
            for row in results.iter_rows():
                kind, line = str(row["kind"]), str(row["line"])
                if kind == "skip":
                    output.skip()
                    continue
                item = json.loads(line)
                if kind == "reject":
                    output.reject(item["id"], item["where"], item["reason"])
                elif record_key(item["id"]) in written:  # the same id in two actors' batches
                    output.reject(item["id"], dataset.paths[0].name,
                                  f"id: {item['id']!r} is the id of an earlier record too")
                else:
                    written.add(record_key(item["id"]))
                    output.write(item)
                bar.update(1)
        summary = output.finish()
    if ray_settings.parquet is not None:
        _write_parquet(ray, summary.out, ray_settings.parquet)
    return summary


def _write_parquet(ray: Any, results: Path, folder: Path) -> None:
    """The results file as Parquet files in `folder` (ids as text: a column has one type)."""

    def as_text_id(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "id": str(row["id"])}

    lines = ray.data.read_text(str(results))
    lines.map(lambda row: as_text_id(json.loads(row["text"]))).write_parquet(str(folder))
