"""Records through the serving engine, in this process: `run_batch`.

A record goes through what a server request goes through (the OpenAI request models, the
server's checks with `batch_limits`, `prepare_prompt`'s door, the engine), up to `EngineConfig.max_queue` of them in
flight at once so that the engine's decode batch stays full and records sharing a support set are
prefilled together (its state encoded once, then kept in the prefix cache).

The output (`BatchOutput`): results are appended to `OUT.partial`, one JSON line per record,
flushed line by line; only a run that reaches the end renames it to OUT. A rerun reads the ids
already in `OUT.partial` (or OUT) and skips them, so a run killed midway and run again ends with
every id exactly once (a line cut by the kill is dropped). Rejected records (bad JSON, a missing
image, a placeholder count that does not match, any refusal the server would answer with a 4xx)
go to `OUT.rejects.jsonl` with their reason; they are tried again by a rerun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from flamingo.config_io import short
from flamingo.errors import UserError
from flamingo.inference.chat import DIALOGUE_STOP_STRINGS
from flamingo.inference.generation import MAX_BEAMS, MAX_NEW_TOKENS
from flamingo.inference.prompt import context_length
from flamingo.model.flamingo import Flamingo
from flamingo.outputs import check_writable
from flamingo.serving.batch.records import BatchDefaults, Dataset, RawRecord, open_dataset, parse_fields
from flamingo.serving.engine import Engine, EngineConfig, EngineRequest, EngineStopped
from flamingo.serving.input_processor import Fields
from flamingo.serving.limits import ServerSettings
from flamingo.serving.media import MediaResolver
from flamingo.serving.openai_format import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_prompt,
    check_unicode,
    collect_choices,
    completion_prompt,
    invalid_field,
    prepare_prompt,
    sampling_params,
    special_tokens,
)

RecordId = str | int
MAX_IMAGES = 256  # images of one record (a many-shot prompt), where a server takes 16 per request


class Rejected(Exception):
    """A record that cannot run: `reason` says why (the field first, as the server's errors)."""

    def __init__(self, record_id: RecordId | None, reason: str) -> None:
        super().__init__(reason)
        self.record_id, self.reason = record_id, reason


def record_key(record_id: RecordId) -> str:
    """How ids are compared: 7 and "7" are different ids."""
    return json.dumps(record_id)


def identify(raw: RawRecord) -> tuple[RecordId, dict[str, Any]]:
    """The record's id and fields; Rejected when it has none or cannot be read."""
    if raw.error is not None:
        raise Rejected(raw.key, raw.error)
    try:
        doc = parse_fields(raw)
    except ValueError as err:
        raise Rejected(raw.key, str(err)) from None
    record_id = doc.get("id", raw.key)
    if record_id is None:
        raise Rejected(None, "id: missing; every record needs an id (a string or an integer)")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        raise Rejected(None, f"id: expected a non-empty string or an integer, got {short(record_id)}")
    return record_id, doc


class RecordRunner:
    """Runs records through one engine (started by the caller), each checked as the server checks a
    request: chat `messages` as /v1/chat/completions, a `prompt` as /v1/completions."""

    def __init__(self, engine: Engine, settings: ServerSettings, defaults: BatchDefaults = BatchDefaults()) -> None:
        self.engine, self.settings, self.defaults = engine, settings, defaults
        model = engine.model
        self.media_token, self.end_of_chunk = model.config.media_token, model.config.end_of_chunk_token
        self.special = special_tokens(model.tokenizer, self.media_token, self.end_of_chunk)
        self.resolver = MediaResolver(settings)
        caps = [c for c in (settings.max_prompt_tokens, context_length(model)) if c is not None]
        self.prompt_cap = min(caps) if caps else None

    async def run(self, raw: RawRecord, record_id: RecordId, doc: dict[str, Any]) -> dict[str, Any]:
        """The record's result line; Rejected for a record the server would refuse."""
        try:
            return await self._run(raw, record_id, doc)
        except (Rejected, UserError, EngineStopped):
            raise
        except Exception as err:  # noqa: BLE001 - the engine's own failure of one record: a reject, not the end
            raise Rejected(record_id, f"engine error: {err}") from err

    async def _run(self, raw: RawRecord, record_id: RecordId, doc: dict[str, Any]) -> dict[str, Any]:
        fields = {k: v for k, v in doc.items() if k != "id"}
        if "beams" in fields:  # the CLI's name of num_beams
            if "num_beams" in fields:
                raise Rejected(record_id, "beams: give beams or num_beams, not both")
            fields["num_beams"] = fields.pop("beams")
        chat = "messages" in fields
        try:
            if chat:
                if "prompt" in fields:
                    raise Rejected(record_id, "prompt: give a prompt or messages, not both")
                body = ChatCompletionRequest.model_validate(fields)
            else:
                images = fields.get("images", list(raw.images))
                if "prompt" not in fields:
                    if self.defaults.prompt is None:
                        raise Rejected(record_id, "prompt: missing; give a prompt (<image> where each image goes) "
                                                  "or chat messages, or run with a default prompt (--prompt)")
                    fields["prompt"] = self.defaults.prompt
                    images = [*self.defaults.prompt_images, *images] if isinstance(images, list) else images
                fields["images"] = images
                body = CompletionRequest.model_validate(fields)
        except ValidationError as err:
            raise invalid_field(err.errors()[0]) from None
        check_unicode(body)
        if chat:
            params = sampling_params(body, self.settings, extra_stop=DIALOGUE_STOP_STRINGS)
            spec = chat_prompt(body.messages, self.media_token, self.end_of_chunk, self.special)
            names = ("messages", "messages")
        else:
            params = sampling_params(body, self.settings)
            spec = completion_prompt(body, self.media_token, self.end_of_chunk, self.special)
            names = ("prompt", "images")
        fields_ = Fields(*names, tuple(where for _, where in spec.image_urls))
        prompt = await prepare_prompt(self.engine.processor, self.resolver, self.settings, spec, fields_,
                                      params.max_tokens, self.prompt_cap)
        deltas = self.engine.generate(EngineRequest(spec.text, prompt.images, params, str(record_id)), prompt)
        texts, reasons, usage = await collect_choices(deltas, params.n)
        return {"id": record_id, "text": texts[0], "finish_reason": reasons[0],
                "choices": [{"text": t, "finish_reason": r} for t, r in zip(texts, reasons)], "usage": usage}

    async def run_or_reject(self, raw: RawRecord, record_id: RecordId, doc: dict[str, Any]
                            ) -> tuple[dict[str, Any] | None, str | None]:
        """(result, None), or (None, the reason it was rejected)."""
        try:
            return await self.run(raw, record_id, doc), None
        except Rejected as err:
            return None, err.reason
        except UserError as err:
            return None, str(err)


@dataclass
class BatchSummary:
    out: Path
    rejects: Path
    written: int = 0  # results this run wrote
    earlier: int = 0  # records an earlier run had finished (skipped)
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # the first words of each reason -> count


class BatchOutput:
    """The result files of a batch run (see the module docstring). Use as a context manager: the
    files are closed when the block ends, and `finish` publishes them."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.rejects = self.out.with_suffix(".rejects.jsonl")
        self.rejects_partial = self.rejects.with_name(self.rejects.name + ".partial")
        self.done: set[str] = set()  # keys of the ids with a result (earlier runs and this one)
        self.summary = BatchSummary(self.out, self.rejects)
        self._results = self._rejected = None

    def __enter__(self) -> BatchOutput:
        check_writable(self.out, "OUT", folder=False)
        if not self.partial.exists() and self.out.is_file():  # a finished output grows by what it lacks
            shutil.copyfile(self.out, self.partial)
        if self.partial.exists():
            self.done = self._recover()
        self._results = open(self.partial, "a", encoding="utf-8")
        self._rejected = open(self.rejects_partial, "w", encoding="utf-8")
        return self

    def _recover(self) -> set[str]:
        """The ids in OUT.partial; a last line cut by a kill is removed."""
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(end)
        keys = set()
        for line in data[:end].splitlines():
            try:
                keys.add(record_key(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours: left as it is, its record runs again
        return keys

    def __exit__(self, *exc: object) -> None:
        for f in (self._results, self._rejected):
            if f is not None and not f.closed:
                f.close()

    def write(self, result: dict[str, Any]) -> None:
        self._results.write(json.dumps(result, ensure_ascii=False) + "\n")  # one write: a kill cuts at most this line
        self._results.flush()
        self.done.add(record_key(result["id"]))
        self.summary.written += 1

    def skip(self) -> None:
        """A record an earlier run finished."""
        self.summary.earlier += 1

    def reject(self, record_id: RecordId | None, where: str, reason: str) -> None:
        self._rejected.write(json.dumps({"id": record_id, "where": where, "reason": reason}, ensure_ascii=False) + "\n")
        self._rejected.flush()
        self.summary.rejected += 1
        kind = reason.split(":", 1)[0][:60]
        self.summary.reasons[kind] = self.summary.reasons.get(kind, 0) + 1

    def finish(self) -> BatchSummary:
        """Publish: OUT.partial becomes OUT (a rename), the rejects file likewise (or goes, when none)."""
        self._results.flush()
        os.fsync(self._results.fileno())
        self._results.close()
        self._rejected.close()
        os.replace(self.partial, self.out)
        if self.summary.rejected:
            os.replace(self.rejects_partial, self.rejects)
        else:
            self.rejects_partial.unlink(missing_ok=True)
            self.rejects.unlink(missing_ok=True)  # an earlier run's: those records ran now
        return self.summary


def run_records(runner: RecordRunner, records: Iterable[RawRecord], output: BatchOutput,
                on_record: Callable[[], None] = lambda: None) -> None:
    """Run `records` through `runner`'s engine (started and stopped here), results and rejects into
    `output` (a BatchOutput, or anything with its `done`, `write`, `reject` and `skip`), records
    whose id is in `output.done` skipped; `on_record` after each record run or rejected."""
    asyncio.run(_run_records(runner, records, output, on_record))


async def _run_records(runner: RecordRunner, records: Iterable[RawRecord], output: BatchOutput,
                       on_record: Callable[[], None]) -> None:
    engine = runner.engine
    window = engine.config.max_queue  # never more waiting than the queue takes: no EngineOverloaded
    started: set[str] = set()
    pending: set[asyncio.Task] = set()

    async def one(raw: RawRecord, record_id: RecordId, doc: dict[str, Any]) -> None:
        result, reason = await runner.run_or_reject(raw, record_id, doc)
        if result is not None:
            output.write(result)
        else:
            output.reject(record_id, raw.where, reason)
        on_record()

    async def settle(block_until: int) -> None:
        nonlocal pending
        while len(pending) > block_until:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure of the run itself (EngineStopped, a bug) ends it

    await engine.start()
    try:
        for raw in records:
            try:
                record_id, doc = identify(raw)
            except Rejected as err:
                output.reject(err.record_id, raw.where, err.reason)
                on_record()
                continue
            key = record_key(record_id)
            if key in output.done and key not in started:
                output.skip()
                continue
            if key in started:
                output.reject(record_id, raw.where, f"id: {short(record_id)} is the id of an earlier record too")
                on_record()
                continue
            started.add(key)
            await settle(window - 1)
            pending.add(asyncio.create_task(one(raw, record_id, doc)))
        await settle(0)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await engine.stop()
        await runner.resolver.aclose()


def batch_limits(default_max_tokens: int = ServerSettings.default_max_tokens) -> ServerSettings:
    """The server's limits for a batch run, whose records come from its own user: the caps a shared
    server puts on one request (new tokens, beams, choices, images) lifted to what the engine takes;
    image sizes and the prompt's length in tokens are checked as the server checks them."""
    return ServerSettings(default_max_tokens=default_max_tokens, max_tokens=max(MAX_NEW_TOKENS, default_max_tokens),
                          max_beams=MAX_BEAMS, max_n=EngineConfig.max_running, max_images=MAX_IMAGES)


def batch_settings(settings: ServerSettings | None, media_root: Path | None) -> ServerSettings:
    """The limits of a batch run (default: `batch_limits`); relative image paths are read under `media_root`."""
    settings = settings or batch_limits()
    if settings.allowed_local_media_path is None and media_root is not None:
        settings = dataclasses.replace(settings, allowed_local_media_path=media_root)
    return settings


def load_engine_model(spec: str, *, device: str = "cpu", quantize: str | None = None,
                      trust_remote_code: bool = False) -> Flamingo:
    """A model ready for the engine, as `flamingo serve` prepares one: on `device`, weight-only
    quantized there (`quantize`), its frozen vision encoder fused for inference (same outputs)."""
    from flamingo.model.quantize import quantize_model
    from flamingo.model.weights import load_model

    model = load_model(spec, trust_remote_code=trust_remote_code).to(device).eval()
    if quantize:
        quantize_model(model, quantize)
    model.fuse_for_inference()
    return model


def run_batch(model: Flamingo, source: str | Path | Dataset, out: str | Path, *, defaults: BatchDefaults = BatchDefaults(),
              settings: ServerSettings | None = None, engine_config: EngineConfig | None = None,
              progress: bool = True) -> BatchSummary:
    """Answer every record of `source` (a .jsonl file, a folder of images, WebDataset shards) with
    `model`, writing `out` (JSONL, one result per record id) and its rejects file; resumes a run
    that stopped midway (see the module docstring). `settings`: the limits records are checked
    against (default: `batch_limits()`); `progress`: a tqdm bar on stderr."""
    from tqdm import tqdm

    dataset = source if isinstance(source, Dataset) else open_dataset(source)
    runner = RecordRunner(Engine(model, engine_config or EngineConfig(max_queue=128)),
                          batch_settings(settings, dataset.media_root), defaults)
    with BatchOutput(out) as output:
        remaining = max(0, dataset.count - len(output.done))
        with tqdm(total=remaining, unit="rec", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
            def step() -> None:
                bar.update(1)
                if output.summary.rejected:
                    bar.set_postfix(rejected=output.summary.rejected, refresh=False)

            run_records(runner, dataset.records(), output, step)
        return output.finish()
