"""The serving engine: requests in, streamed text deltas out, many requests in one decode batch.

- Continuous (iteration-level) batching: the running sequences are one `FlamingoState` batch
  (LM KV cache, visual tokens, cross-attention keys/values). Waiting requests that fit are
  prefilled (up to `prefill_chunk` at a time, together), their first tokens streamed at once, and
  concatenated into it (`FlamingoState.concat`: left-padded histories, media rows padded to the
  most images); finished and cancelled sequences leave it after every step. Prefills come before
  decode steps (as in vLLM's default scheduler): a request's first token does not wait for the
  others' decoding, and the decode batch is as large as it can be. Beam search and ranking
  requests run as a batch of their own; between their forward passes (a ranking's hold a bounded
  number of candidate tokens) the decode batch takes a step or admits new requests, so a long
  ranking does not stall the other answers.
- Prefix cache: a prompt is split at its last chunk boundary (before its last image, or after
  its last <|endofchunk|>: a chat's last reply); the state after the prefix (text and image
  bytes, hashed) is kept in an LRU bounded by bytes and continued with `extend_contexts`
  (the queries of every prefix in a prefill chunk in one forward pass), so the few-shot support
  set of a task is encoded once for all users. A hit computes what a miss computes (the miss
  encodes the prefix, stores it, then extends it the same way). A missed prefix continues the
  longest cached prefix of itself, if any (a chat's previous turn), rather than starting over.
- Model compute runs in one background thread (it blocks); each request's deltas reach its
  asyncio consumer through `loop.call_soon_threadsafe`. Requests are validated when submitted (a
  bad prompt or option raises at once, before any delta), wait in a bounded queue
  (`EngineOverloaded` when it is full), and a consumer that stops iterating cancels its request.
  Stopping (`request_stop`, e.g. on Ctrl-C; `stop`) ends the running and waiting requests with
  `EngineStopped` after the current step, without decoding them to their end.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hashlib
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch
from PIL import Image

from flamingo.errors import UserError
from flamingo.inference.generation import (
    Generation,
    GenerationConfig,
    SequenceDecoder,
    beam_search,
    choose_next_tokens,
    sampling_generator,
)
from flamingo.inference.prompt import Prompt, context_length
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import FlamingoState, encode_prompts, extend, extend_contexts, has_windowed_attention
from flamingo.model.flamingo import Flamingo
from flamingo.model.image_processing import decode_image
from flamingo.serving.metrics import EngineMetrics

MIN_TEXT_PREFIX_TOKENS = 32  # a prefix without images is cached only from this length on
MAX_CHAINED_CUTS = 8  # a missed prefix looks for a cached shorter one at its last few cuts
RANK_TOKENS_PER_PASS = 128  # candidate tokens per forward pass of a ranking, between decode steps (measured:
# benchmarks/serve_rank_ttft.py, chat TTFT during a 1049-token ranking: max 29 s at 512, 17 s at 128)


def release_openmp_threads() -> None:
    """Free the calling thread's idle OpenMP worker threads (OpenMP 5's omp_pause_resource_all;
    they come back if it runs parallel work again). The thread that loaded the model keeps a team
    of them, and while it exists libgomp counts more threads than cores and throttles every
    parallel region of the engine thread (its workers sleep instead of spinning between regions):
    on 2 cores the engine ran ~1.3x slower. Does nothing without an OpenMP runtime."""
    if not torch.backends.openmp.is_available():
        return
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError, TypeError):  # no such symbol loaded; no dlopen(NULL) (Windows)
        return
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    pause(1)  # omp_pause_soft


class EngineRequestError(UserError):
    """A request the engine cannot run: the message names the field."""


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is stopping (the server shuts down): the request was not run, or was cut short (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    n: int = 1  # independent samples (choices)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (extension field); n <= num_beams

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise EngineRequestError(message)

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens: expected an integer >= 1, "
              f"got {self.max_tokens!r}")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
              f"temperature: expected a number in [0, 100], got {self.temperature!r}")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
              f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        check(is_int(self.n) and self.n >= 1, f"n: expected an integer >= 1, got {self.n!r}")
        check(is_int(self.num_beams) and self.num_beams >= 1,
              f"num_beams: expected an integer >= 1, got {self.num_beams!r}")
        check(self.seed is None or is_int(self.seed), f"seed: expected an integer, got {self.seed!r}")
        check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
              "stop: expected a tuple of non-empty strings")
        if self.num_beams > 1:
            check(self.n <= self.num_beams, f"n: expected at most num_beams ({self.num_beams}) with beam search, "
                  f"got {self.n}")
            check(self.temperature == 0, "temperature: beam search is deterministic; use temperature 0 with "
                  "num_beams > 1")

    def generation_config(self, choice: int = 0) -> GenerationConfig:
        """The decoding options of one choice; choice i of a seeded request draws with seed + i."""
        sample = self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_tokens, num_beams=self.num_beams, do_sample=sample,
                                temperature=self.temperature if sample else 1.0, top_p=self.top_p,
                                seed=None if self.seed is None else self.seed + choice, stop_strings=self.stop)


@dataclass
class EngineRequest:
    text: str  # the Flamingo prompt, with the model's media token where each image goes
    images: list[bytes]  # raw encoded image bytes, one per media token
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass
class Delta:
    """One streamed piece of one choice."""

    index: int  # choice index (0..n-1)
    text: str  # new text (may be "")
    finish_reason: str | None  # None while running; "stop" | "length" at the end of that choice
    prompt_tokens: int = 0  # usage, filled on the final delta of each choice
    completion_tokens: int = 0


@dataclass
class EngineConfig:
    max_queue: int = 64  # waiting requests; beyond -> EngineOverloaded (HTTP 429)
    max_running: int = 64  # concurrent sequences in the decode batch
    prefill_chunk: int = 16  # requests prefilled together; their first tokens are sent before the next chunk's
    prefix_cache_bytes: int = 1 << 30  # LRU bound of the prefix cache
    max_prompt_tokens: int | None = None


_FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}
_END = object()  # the last item of a stream


class _Cancelled(Exception):
    """Raised inside a beam search or ranking whose client went away."""


@dataclass
class _Split:
    """A prompt cut at its last chunk boundary (`Engine._cuts`): the cacheable prefix and the rest."""

    key: str  # hash of the prefix's token ids and image bytes
    prefix_text: str
    prefix_ids: list[int]
    prefix_images: list[bytes]
    prefix_media: list[list[Image.Image]] | None  # decoded; None while the prefix is cached (not needed)
    suffix: Prompt

    def prefix(self) -> Prompt:
        """The prefix as a prompt, its images decoded now if they were not at submission (the
        prefix was cached then; these bytes decoded without error when it was stored)."""
        if self.prefix_media is None:
            self.prefix_media = [[decode_image(data)] for data in self.prefix_images]
        return Prompt(self.prefix_text, self.prefix_media)


class _Job:
    """A submitted request: its decoded prompt (or, when it has a cacheable prefix, its split),
    and the channel back to its consumer's loop."""

    def __init__(self, prompt: Prompt | None, prompt_tokens: int, split: _Split | None, params: SamplingParams,
                 loop: asyncio.AbstractEventLoop, candidates: list[str] | None = None) -> None:
        self.prompt, self.prompt_tokens, self.split, self.params = prompt, prompt_tokens, split, params
        self.candidates = candidates  # a ranking job
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the consumer's side; read by the engine thread
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.unfinished_choices = params.n

    @property
    def runs_alone(self) -> bool:
        """Ranking and beam search run as a batch of their own, not in the decode batch."""
        return self.candidates is not None or self.params.num_beams > 1

    def send(self, item: object) -> None:
        """From the engine thread: hand a Delta, a result, an exception or _END to the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass
class _Sequence:
    """One choice of a job in the running batch."""

    job: _Job
    choice: int
    config: GenerationConfig
    decoder: SequenceDecoder
    generator: torch.Generator | None


class RequestStream:
    """The deltas of one request, as an async iterator. Closing it (or the consuming task being
    cancelled, or it being dropped) cancels the request and frees its sequences' slots."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._job.outbox.get()
        except BaseException:  # cancelled while waiting (client disconnect)
            self._cancel()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._job.cancelled = True

    def __del__(self) -> None:
        self._cancel()


class PrefixCache:
    """Encoded prompt prefixes (batch-1 states, never modified), least recently used first out,
    within a byte budget."""

    def __init__(self, capacity_bytes: int, metrics: EngineMetrics) -> None:
        self.capacity_bytes = capacity_bytes
        self.metrics = metrics
        self.entries: collections.OrderedDict[str, tuple[FlamingoState, int]] = collections.OrderedDict()
        self.bytes = 0

    def __contains__(self, key: str) -> bool:  # no LRU update: safe to ask from another thread
        return key in self.entries

    def get(self, key: str) -> FlamingoState | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, state: FlamingoState) -> None:
        size = state.nbytes()
        if size > self.capacity_bytes or key in self.entries:
            return
        while self.bytes + size > self.capacity_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
            self.metrics.prefix_cache_evictions.inc()
        self.entries[key] = (state, size)
        self.bytes += size
        self.metrics.prefix_cache_bytes.set(self.bytes)


class Engine:
    """Serves one model. Usage (inside a running event loop):

        engine = Engine(model)
        await engine.start()
        async for delta in engine.generate(EngineRequest("<image>Output:", [png_bytes])):
            ...
        await engine.stop()
    """

    def __init__(self, model: Flamingo, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        config = self.config
        if min(config.max_queue, config.max_running, config.prefill_chunk) < 1 or config.prefix_cache_bytes < 0:
            raise EngineRequestError(f"max_queue, max_running, prefill_chunk: expected integers >= 1, "
                                     f"prefix_cache_bytes >= 0; got {config.max_queue}, {config.max_running}, "
                                     f"{config.prefill_chunk}, {config.prefix_cache_bytes}")
        if has_windowed_attention(model):
            raise EngineRequestError(
                f"the language model ({type(model.lm).__name__}) has sliding-window or chunked attention layers; "
                f"the serving engine batches requests by padding and concatenating LM caches, which needs full "
                f"attention in every layer (use flamingo generate / chat for this model)")
        self.metrics = EngineMetrics()
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes, self.metrics)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: weakref.WeakSet[_Job] = weakref.WeakSet()  # submitted, still referenced (by a consumer)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is None:
            release_openmp_threads()  # the model's work now happens in the engine thread
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flamingo-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread (after its current step); requests still running or waiting end
        with EngineStopped."""
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def request_stop(self) -> None:
        """Begin stopping without waiting (safe in a signal handler: takes no lock): new requests
        are refused, and the running and waiting ones end with EngineStopped now, without waiting
        for the current step (which may take seconds), so that their responses close at once;
        the engine thread drops them. `stop` then joins the thread after its current step."""
        self._stopping = True
        for job in list(self._jobs):
            if not job.cancelled:
                job.cancelled = True
                job.send(EngineStopped("the server is shutting down: the request was cancelled"))

    # ------------------------------------------------------------------ requests
    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Submit a request; its deltas arrive through the returned iterator. Raises
        EngineOverloaded when the queue is full and a UserError for a bad request, at once."""
        params = request.params
        if not isinstance(params, SamplingParams):
            raise EngineRequestError("params: expected SamplingParams")
        if params.num_beams == 1 and params.n > self.config.max_running:
            raise EngineRequestError(f"n: at most {self.config.max_running} (the engine's concurrent sequences), "
                                     f"got {params.n}")
        job = _Job(*self._prompt(request.text, request.images, params.max_tokens), params,
                   asyncio.get_running_loop())
        self._submit(job)
        return RequestStream(job)

    async def rank(self, text: str, images: list[bytes], candidates: list[str]) -> list[float]:
        """Total log-likelihood of each candidate continuation of the prompt."""
        if not isinstance(candidates, list) or not candidates:
            raise EngineRequestError("candidates: expected a non-empty list of strings")
        for i, candidate in enumerate(candidates):
            if not isinstance(candidate, str) or not self.model.tokenizer(candidate, add_special_tokens=False)[
                    "input_ids"]:
                raise EngineRequestError(f"candidates[{i}]: expected a string of at least one token")
        job = _Job(*self._prompt(text, images, 0), SamplingParams(max_tokens=1), asyncio.get_running_loop(),
                   candidates=list(candidates))
        self._submit(job)
        async for scores in RequestStream(job):  # one item: the scores
            return scores
        raise asyncio.CancelledError

    def _prompt(self, text: str, images: list[bytes], max_new_tokens: int
                ) -> tuple[Prompt | None, int, _Split | None]:
        """Check and decode a prompt (placeholders vs images, token limits, image data) and find
        its cacheable prefix. The images of a prefix that is cached are not decoded: they were
        when it was stored."""
        if not isinstance(text, str) or not text:
            raise EngineRequestError("text: expected a non-empty prompt")
        token = self.model.config.media_token
        if text.count(token) != len(images):
            raise EngineRequestError(f"images: the prompt has {text.count(token)} {token} placeholder(s) but "
                                     f"{len(images)} image(s) were given")
        ids = self.model.tokenizer(text)["input_ids"]
        limit = self.config.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise EngineRequestError(f"prompt: {len(ids)} tokens, more than the limit of {limit}")
        context = context_length(self.model)
        if context is not None and len(ids) + max_new_tokens > context:
            raise EngineRequestError(f"max_tokens: the prompt has {len(ids)} tokens and {max_new_tokens} new "
                                     f"tokens are asked for, more than the model's context of {context}")
        split = self._split(text, ids, images)
        cached = len(split.prefix_images) if split is not None and split.key in self.prefix_cache else 0
        media = [[decode_image(data, name=f"images[{i}]")] for i, data in enumerate(images) if i >= cached]
        if split is None:
            return Prompt(text, media), len(ids), None
        before = len(split.prefix_images)
        split.prefix_media = None if cached else media[:before]
        split.suffix = Prompt(split.suffix.text, media[before - cached:])
        return None, len(ids), split  # encoded from its parts

    def _cuts(self, text: str) -> list[int]:
        """Where a prompt may be cut for caching, in order: before each image and after each
        <|endofchunk|> (a few-shot example's end, or a chat reply's)."""
        media, end = self.model.config.media_token, self.model.config.end_of_chunk_token
        cuts = {m.start() for m in re.finditer(re.escape(media), text)}
        cuts |= {m.end() for m in re.finditer(re.escape(end), text)}
        return sorted(cut for cut in cuts if 0 < cut < len(text))

    def _prefix_key(self, prefix_ids: list[int], images: list[bytes]) -> str:
        digest = hashlib.sha256(repr(prefix_ids).encode())
        for data in images:
            digest.update(hashlib.sha256(data).digest())
        return digest.hexdigest()

    def _split(self, text: str, ids: list[int], images: list[bytes]) -> _Split | None:
        """Cut the prompt at its last cut (`_cuts`: before the query image of a few-shot prompt,
        after the last reply of a chat) when the part before is worth caching and tokenizes on its
        own exactly as inside the whole prompt (media not decoded yet)."""
        token = self.model.config.media_token
        cuts = self._cuts(text)
        if self.config.prefix_cache_bytes == 0 or not cuts:
            return None
        cut = cuts[-1]
        images_before = text[:cut].count(token)
        prefix_ids = self.model.tokenizer(text[:cut])["input_ids"]
        if images_before == 0 and len(prefix_ids) < MIN_TEXT_PREFIX_TOKENS:
            return None
        if not self._tokenizes_apart(prefix_ids, text[cut:], ids):
            return None
        return _Split(self._prefix_key(prefix_ids, images[:images_before]), text[:cut], prefix_ids,
                      images[:images_before], None, Prompt(text[cut:], []))

    def _tokenizes_apart(self, head_ids: list[int], tail: str, ids: list[int]) -> bool:
        """Whether a text whose ids are `ids` tokenizes as its head (`head_ids`) then `tail` on its
        own: the tokenizer does not merge across the cut."""
        return head_ids + self.model.tokenizer(tail, add_special_tokens=False)["input_ids"] == ids

    def _encode_prefix(self, split: _Split) -> FlamingoState:
        """The state after a prefix that is not cached: the longest cached prefix of it (at an
        earlier cut: e.g. the chat up to the previous reply) continued with the rest, else the
        prefix encoded from scratch."""
        token = self.model.config.media_token
        prefix = split.prefix()
        for cut in reversed(self._cuts(prefix.text)[-MAX_CHAINED_CUTS:]):
            before = prefix.text[:cut].count(token)
            ids = self.model.tokenizer(prefix.text[:cut])["input_ids"]
            context = self.prefix_cache.get(self._prefix_key(ids, split.prefix_images[:before]))
            if context is None:
                continue
            if not self._tokenizes_apart(ids, prefix.text[cut:], split.prefix_ids):
                break
            return extend(self.model, context, [Prompt(prefix.text[cut:], prefix.media[before:])])
        return encode_prompts(self.model, [prefix])

    def _submit(self, job: _Job) -> None:
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                self.metrics.requests_rejected.labels("queue_full").inc()
                raise EngineOverloaded(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._waiting.append(job)
            self._jobs.add(job)
            self.metrics.queue_length.set(len(self._waiting))
            self._wake.notify()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        state: FlamingoState | None = None
        running: list[_Sequence] = []
        pending: torch.Tensor | None = None  # each running sequence's chosen (and sent) token, not yet fed

        def admit(joining: list[_Job]) -> None:
            nonlocal state, running, pending
            new = self._guarded(joining, lambda: self._admit(joining))
            if new is not None and new[1]:
                state = new[0] if state is None else FlamingoState.concat([state, new[0]])
                running += new[1]
                pending = new[2] if pending is None else torch.cat([pending, new[2]])

        def decode() -> None:
            nonlocal state, running, pending
            result = self._guarded(list(dict.fromkeys(s.job for s in running)),
                                   lambda: self._decode_step(state, running, pending))
            state, running, pending = result if result is not None else (None, [], None)

        def between_passes() -> None:
            """Between the forward passes of a ranking or beam search: the decode batch goes on
            (a step), or requests join it, so that one long job does not stall every other
            answer; ranking and beam search jobs wait their turn."""
            joining = self._take_waiting(room=self.config.max_running - len(running), block=False, alone=False)
            if joining:
                admit(joining)
            elif joining is not None and running:
                decode()
            self.metrics.running_sequences.set(len(running))

        with torch.inference_mode():
            while True:
                joining = self._take_waiting(room=self.config.max_running - len(running), block=not running)
                if joining is None:  # stopping
                    break
                if joining:  # prefills first: the next decode step waits until every prompt that fits has joined
                    batched = [j for j in joining if not j.runs_alone]
                    if batched:
                        admit(batched)
                    for job in [j for j in joining if j.runs_alone]:
                        self._guarded([job], lambda job=job: self._run_alone(job, between_passes))
                elif running:
                    decode()
                self.metrics.running_sequences.set(len(running))
        error = EngineStopped("the server is shutting down: the request was cancelled")
        with self._wake:
            for job in {s.job for s in running} | set(self._waiting):
                job.send(error)
            self._waiting.clear()

    def _take_waiting(self, room: int, block: bool, alone: bool = True) -> list[_Job] | None:
        """Waiting jobs that fit in `room` free sequence slots, first come first served, at most
        `prefill_chunk` (None: the engine is stopping). Blocks until there is one when `block`.
        Without `alone`, ranking and beam search jobs are passed over (they stay waiting)."""
        with self._wake:
            while block and not self._waiting and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            # While sequences run, wait until a quarter of the slots are free (or all the waiting
            # jobs fit): one forward pass over several prompts is cheaper than one pass each.
            if not block and room < min(len(self._waiting), max(1, self.config.max_running // 4)):
                return []
            taken, passed_over = [], []
            while self._waiting and len(taken) < self.config.prefill_chunk:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                if job.runs_alone and not alone:
                    passed_over.append(self._waiting.popleft())
                    continue
                if not job.runs_alone and job.params.n > room:
                    break
                taken.append(self._waiting.popleft())
                room -= 0 if job.runs_alone else job.params.n
            self._waiting.extendleft(reversed(passed_over))
            self.metrics.queue_length.set(len(self._waiting))
            return taken

    def _guarded(self, jobs: list[_Job], work):
        """Run `work`; if it fails, its jobs end with the error (a UserError or EngineStopped as it
        is, anything else as an engine error) and the engine goes on serving the others."""
        try:
            return work()
        except Exception as error:  # noqa: BLE001 - the consumers get it; the engine keeps serving
            failure = error if isinstance(error, (UserError, EngineStopped)) else RuntimeError(
                f"engine error: {error!r}")
            for job in jobs:
                job.send(failure)
                job.send(_END)
            return None

    def _encode(self, jobs: list[_Job]) -> tuple[FlamingoState, list[_Job]]:
        """Prefill the prompts of `jobs`: one row each, in the returned order. Prompts with a
        cached (or cacheable) prefix continue it, all of them in one forward pass whatever their
        prefixes; the others are encoded together."""
        plain = [job for job in jobs if job.split is None]
        by_prefix: dict[str, list[_Job]] = {}
        for job in jobs:
            if job.split is not None:
                by_prefix.setdefault(job.split.key, []).append(job)
        states, order = [], []
        if plain:
            states.append(encode_prompts(self.model, [job.prompt for job in plain]))
            order += plain
        contexts = []
        for key, group in by_prefix.items():
            context = self.prefix_cache.get(key)
            if context is None:
                if self._stopping:  # each miss takes a while (its images, its text): stop between them
                    raise EngineStopped("the server is shutting down: the request was cancelled")
                self.metrics.prefix_cache_misses.inc()
                context = self._encode_prefix(group[0].split)
                self.prefix_cache.put(key, context)
                self.metrics.prefix_cache_hits.inc(len(group) - 1)
            else:
                self.metrics.prefix_cache_hits.inc(len(group))
            contexts.append(context)
            order += group
        if contexts:
            states.append(extend_contexts(self.model, contexts, [[job.split.suffix for job in group]
                                                                 for group in by_prefix.values()]))
        return FlamingoState.concat(states), order

    def _admit(self, jobs: list[_Job]) -> tuple[FlamingoState | None, list[_Sequence], torch.Tensor | None]:
        """Prefill the joining jobs' prompts (one row per choice) and choose, and send, their first tokens."""
        state, order = self._encode(jobs)
        if any(job.params.n > 1 for job in order):
            rows = [row for row, job in enumerate(order) for _ in range(job.params.n)]
            state = state.select_rows(torch.tensor(rows, device=state.attention_mask.device))
        device = state.next_token_logits.device
        sequences = []
        for job in order:
            for choice in range(job.params.n):
                config = job.params.generation_config(choice)
                sequences.append(_Sequence(job, choice, config, SequenceDecoder(self.model, config, stream=True),
                                           sampling_generator(config, device)))
        return self._choose(state, sequences)

    def _decode_step(self, state: FlamingoState, running: list[_Sequence], pending: torch.Tensor
                     ) -> tuple[FlamingoState | None, list[_Sequence], torch.Tensor | None]:
        """Feed every running sequence its chosen token, then choose the next ones."""
        state.step(self.model, pending[:, None])
        return self._choose(state, running)

    def _choose(self, state: FlamingoState, sequences: list[_Sequence]
                ) -> tuple[FlamingoState | None, list[_Sequence], torch.Tensor | None]:
        """Choose every sequence's next token from the state's logits and stream it; drop the
        sequences that ended or were cancelled. Returns the state, sequences and chosen tokens
        of the others (the tokens still to be fed)."""
        logits = state.next_token_logits
        tokens = logits.argmax(-1)
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                tokens[row] = choose_next_tokens(logits[row:row + 1], sequence.config, sequence.generator)[0]
        keep = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens.tolist())):
            job = sequence.job
            if job.cancelled:
                continue
            shown = sequence.decoder.add(token)
            self.metrics.generated_tokens.inc()
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                self.metrics.time_to_first_token.observe(job.first_token_at - job.submitted)
            if shown:
                job.send(Delta(sequence.choice, shown, None))
            if sequence.decoder.result is not None:
                self._finish(job, sequence.choice, sequence.decoder.result)
            else:
                keep.append(row)
        if not keep:
            return None, [], None
        if len(keep) < len(sequences):
            state = state.select_rows(torch.tensor(keep, device=tokens.device)).without_leading_padding()
        return state, [sequences[row] for row in keep], tokens[keep]

    def _run_alone(self, job: _Job, between_passes: Callable[[], None]) -> None:
        """A ranking or beam search job, as a batch of its own: `between_passes` runs between its
        forward passes (the decode batch goes on), and it is abandoned there when the engine
        stops or the client goes away. A ranking's passes hold about RANK_TOKENS_PER_PASS
        candidate tokens each, so that the decode batch is never held up long."""
        def check() -> None:
            if self._stopping:
                raise EngineStopped("the server is shutting down: the request was cancelled")
            if job.cancelled:
                raise _Cancelled
            between_passes()

        state, _ = self._encode([job])
        try:
            if job.candidates is not None:
                longest = max(len(ids) for ids in self.model.tokenizer(job.candidates, add_special_tokens=False)[
                    "input_ids"])
                scores = score_candidates(self.model, state, [job.candidates], before_step=check,
                                          max_rows=max(1, RANK_TOKENS_PER_PASS // longest))
                job.send(scores.sum_logprob[0].tolist())
                job.send(_END)
                return
            results = beam_search(self.model, state, job.params.generation_config(), num_return=job.params.n,
                                  before_step=check)[0]
        except _Cancelled:  # nobody is listening
            return
        job.first_token_at = time.perf_counter()
        self.metrics.time_to_first_token.observe(job.first_token_at - job.submitted)
        for choice, result in enumerate(results):
            self.metrics.generated_tokens.inc(len(result.token_ids))
            job.send(Delta(choice, result.text, None))
            self._finish(job, choice, result)

    def _finish(self, job: _Job, choice: int, result: Generation) -> None:
        job.send(Delta(choice, "", _FINISH_REASONS[result.finish_reason], job.prompt_tokens, len(result.token_ids)))
        job.unfinished_choices -= 1
        if job.unfinished_choices == 0:
            self.metrics.request_latency.observe(time.perf_counter() - job.submitted)
            job.send(_END)
