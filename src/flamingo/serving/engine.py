"""The serving engine: requests in, streamed text deltas out.

Model compute runs in one background thread (it blocks); each request's deltas reach its asyncio
consumer through `loop.call_soon_threadsafe`. Requests are validated when submitted (a bad prompt
or option raises at once, before any delta), wait in a bounded queue (`EngineOverloaded` when it
is full), and a consumer that stops iterating cancels its request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from flamingo.errors import UserError
from flamingo.inference.generation import Generation, GenerationConfig, beam_search, generate
from flamingo.inference.prompt import Prompt, PromptError, context_length
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.model.flamingo import Flamingo
from flamingo.model.image_processing import decode_image
from flamingo.serving.metrics import EngineMetrics


class EngineRequestError(UserError):
    """A request the engine cannot run: the message names the field."""


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


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
    max_running: int = 16  # concurrent sequences in the decode batch
    prefix_cache_bytes: int = 1 << 30  # LRU bound of the prefix cache
    max_prompt_tokens: int | None = None


_FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}
_END = object()  # the last item of a stream


class _Job:
    """A submitted request: its decoded prompt, and the channel back to its consumer's loop."""

    def __init__(self, prompt: Prompt, prompt_tokens: int, params: SamplingParams,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompt, self.prompt_tokens, self.params = prompt, prompt_tokens, params
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the consumer's side; read by the engine thread
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.candidates: list[str] | None = None  # a ranking job

    def send(self, item: object) -> None:
        """From the engine thread: hand a Delta, an exception or _END to the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


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
        if self.config.max_queue < 1 or self.config.max_running < 1:
            raise EngineRequestError(f"max_queue and max_running: expected integers >= 1, got "
                                     f"{self.config.max_queue} and {self.config.max_running}")
        self.metrics = EngineMetrics()
        self._waiting: queue.Queue = queue.Queue()
        self._waiting_count = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flamingo-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._waiting.put(None)  # wake the thread
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    # ------------------------------------------------------------------ requests
    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Submit a request; its deltas arrive through the returned iterator. Raises
        EngineOverloaded when the queue is full and a UserError for a bad request, at once."""
        if not isinstance(request.params, SamplingParams):
            raise EngineRequestError("params: expected SamplingParams")
        prompt, prompt_tokens = self._prompt(request.text, request.images, request.params.max_tokens)
        job = _Job(prompt, prompt_tokens, request.params, asyncio.get_running_loop())
        self._submit(job)
        return RequestStream(job)

    async def rank(self, text: str, images: list[bytes], candidates: list[str]) -> list[float]:
        """Total log-likelihood of each candidate continuation of the prompt."""
        if not candidates or not all(isinstance(c, str) and c for c in candidates):
            raise EngineRequestError("candidates: expected a non-empty list of non-empty strings")
        for i, c in enumerate(candidates):
            if not self.model.tokenizer(c, add_special_tokens=False)["input_ids"]:
                raise EngineRequestError(f"candidates[{i}]: has no tokens")
        prompt, prompt_tokens = self._prompt(text, images, 0)
        job = _Job(prompt, prompt_tokens, SamplingParams(max_tokens=1), asyncio.get_running_loop())
        job.candidates = list(candidates)
        self._submit(job)
        async for scores in RequestStream(job):  # one item: the scores
            return scores
        raise asyncio.CancelledError

    def _prompt(self, text: str, images: list[bytes], max_new_tokens: int) -> tuple[Prompt, int]:
        """Check and decode a prompt: placeholders vs images, token limits, image data."""
        if not isinstance(text, str) or not text:
            raise EngineRequestError("text: expected a non-empty prompt")
        token = self.model.config.media_token
        if text.count(token) != len(images):
            raise EngineRequestError(f"images: the prompt has {text.count(token)} {token} placeholder(s) but "
                                     f"{len(images)} image(s) were given")
        prompt_tokens = len(self.model.tokenizer(text)["input_ids"])
        limit = self.config.max_prompt_tokens
        if limit is not None and prompt_tokens > limit:
            raise EngineRequestError(f"prompt: {prompt_tokens} tokens, more than the limit of {limit}")
        context = context_length(self.model)
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise EngineRequestError(f"max_tokens: the prompt has {prompt_tokens} tokens and {max_new_tokens} new "
                                     f"tokens are asked for, more than the model's context of {context}")
        media = [[decode_image(data, name=f"images[{i}]")] for i, data in enumerate(images)]
        return Prompt(text, media), prompt_tokens

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._waiting_count >= self.config.max_queue:
                self.metrics.requests_rejected.labels("queue_full").inc()
                raise EngineOverloaded(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._waiting_count += 1
            self.metrics.queue_length.set(self._waiting_count)
        self._waiting.put(job)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stopping:
            job = self._waiting.get()
            if job is None:
                continue
            with self._lock:
                self._waiting_count -= 1
                self.metrics.queue_length.set(self._waiting_count)
            if job.cancelled:
                continue
            try:
                with torch.no_grad():
                    if job.candidates is not None:
                        self._rank(job)
                    else:
                        self._generate(job)
            except Exception as error:  # noqa: BLE001 - the consumer gets it; the engine keeps serving
                job.send(error if isinstance(error, UserError) else RuntimeError(f"engine error: {error!r}"))
            job.send(_END)

    def _rank(self, job: _Job) -> None:
        state = encode_prompts(self.model, [job.prompt])
        job.send(score_candidates(self.model, state, [job.candidates]).sum_logprob[0].tolist())

    def _generate(self, job: _Job) -> None:
        params = job.params
        state = encode_prompts(self.model, [job.prompt], max_new_tokens=params.max_tokens)
        self.metrics.running_sequences.set(params.n)
        if params.num_beams > 1:
            results = beam_search(self.model, state, params.generation_config(), num_return=params.n)[0]
            for choice, result in enumerate(results):
                self._first_token(job)
                job.send(Delta(choice, result.text, None))
                self._finish(job, choice, result)
        for choice in range(params.n if params.num_beams == 1 else 0):
            def on_text(row: int, text: str, choice: int = choice) -> None:
                self._first_token(job)
                job.send(Delta(choice, text, None))

            self._finish(job, choice, generate(self.model, state, params.generation_config(choice), on_text)[0])
            if job.cancelled:
                break
        self.metrics.running_sequences.set(0)
        self.metrics.request_latency.observe(time.perf_counter() - job.submitted)

    def _finish(self, job: _Job, choice: int, result: Generation) -> None:
        self.metrics.generated_tokens.inc(len(result.token_ids))
        job.send(Delta(choice, "", _FINISH_REASONS[result.finish_reason], job.prompt_tokens, len(result.token_ids)))

    def _first_token(self, job: _Job) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.time_to_first_token.observe(job.first_token_at - job.submitted)
