"""The serving engine: requests in, streamed text deltas out, many requests in one decode batch.

`Engine` is the facade over four parts, as vLLM v1 splits its engine:

- `input_processor`: at the door, a request's prompt is tokenized once and each image decoded
  (and preprocessed) once; the limits (placeholders vs images, prompt tokens, the model's context)
  are checked there, and a bad request raises at once, before any delta. Token ids and pixels
  travel down from there.
- `scheduler`: the bounded waiting queue (`EngineOverloaded` when it is full), admission into the
  decode batch (prefills first), beam search and ranking interleaved with decode steps, and the
  loop of the engine thread.
- `model_runner`: the forward passes over `FlamingoState`s: prefills (with the prefix cache: a
  few-shot support set or a chat's earlier turns encoded once; chats within a budget of their own)
  and the image cache (an image's visual tokens, whatever prompt it comes in), decode steps, beam
  search, ranking.
- `output_processor`: incremental detokenization and stop strings, and the deltas to each
  request's stream.

Model compute runs in one background thread (it blocks); each request's deltas reach its asyncio
consumer through `loop.call_soon_threadsafe`, and a consumer that stops iterating cancels its
request. Stopping (`request_stop`, e.g. on Ctrl-C; `stop`) ends the running and waiting requests
with `EngineStopped` after the current step, without decoding them to their end.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from flamingo.inference.state import has_windowed_attention
from flamingo.model.flamingo import Flamingo
from flamingo.serving.input_processor import (
    EngineRequestError,
    Fields,
    InputProcessor,
    ProcessedPrompt,
    SamplingParams,
)
from flamingo.serving.image_cache import ImageCache
from flamingo.serving.metrics import EngineMetrics
from flamingo.serving.model_runner import ModelRunner, PrefixCache
from flamingo.serving.output_processor import Delta, OutputProcessor, RequestStream
from flamingo.serving.request import EngineOverloaded, EngineStopped, Job
from flamingo.serving.scheduler import Scheduler

__all__ = ["Delta", "Engine", "EngineConfig", "EngineOverloaded", "EngineRequest", "EngineRequestError",
           "EngineStopped", "SamplingParams", "release_openmp_threads"]


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


@dataclass
class EngineRequest:
    text: str  # the Flamingo prompt, with the model's media token where each image goes
    images: list[bytes]  # raw encoded image bytes, one per media token
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass
class EngineConfig:
    max_queue: int = 64  # waiting requests; beyond -> EngineOverloaded (HTTP 429)
    max_running: int = 64  # concurrent sequences in the decode batch
    prefill_chunk: int = 16  # requests prefilled together; their first tokens are sent before the next chunk's
    prefix_cache_bytes: int = 1 << 30  # LRU bound of the prefix cache (0: no prefix caching)
    chat_cache_bytes: int = 256 << 20  # LRU bound of the chats' prefixes, apart (0: chats' prefixes not cached)
    image_cache_bytes: int = 256 << 20  # LRU bound of the image cache (0: none)
    max_prompt_tokens: int | None = None


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
        if min(config.max_queue, config.max_running, config.prefill_chunk) < 1 or \
                min(config.prefix_cache_bytes, config.chat_cache_bytes, config.image_cache_bytes) < 0:
            raise EngineRequestError(f"max_queue, max_running, prefill_chunk: expected integers >= 1, "
                                     f"prefix_cache_bytes, chat_cache_bytes, image_cache_bytes >= 0; got "
                                     f"{config.max_queue}, {config.max_running}, {config.prefill_chunk}, "
                                     f"{config.prefix_cache_bytes}, {config.chat_cache_bytes}, "
                                     f"{config.image_cache_bytes}")
        if has_windowed_attention(model):
            raise EngineRequestError(
                f"the language model ({type(model.lm).__name__}) has sliding-window or chunked attention layers; "
                f"the serving engine batches requests by padding and concatenating LM caches, which needs full "
                f"attention in every layer (use flamingo generate / chat for this model)")
        self.metrics = EngineMetrics()
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, self.metrics, config.chat_cache_bytes)
        self.image_cache = ImageCache(config.image_cache_bytes, self.metrics) if config.image_cache_bytes else None
        self.processor = InputProcessor(model, config.max_prompt_tokens, config.prefix_cache_bytes > 0,
                                        self.prefix_cache.__contains__,
                                        self.image_cache.__contains__ if self.image_cache else lambda digest: False)
        self.output = OutputProcessor(model, self.metrics)
        self.scheduler = Scheduler(config.max_queue, config.max_running, config.prefill_chunk, self.output,
                                   self.metrics)
        self.runner = ModelRunner(model, self.prefix_cache, self.output, self.metrics,
                                  lambda: self.scheduler.stopping, self.image_cache)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is None:
            release_openmp_threads()  # the model's work now happens in the engine thread
            self.scheduler.stopping = False
            self._thread = threading.Thread(target=self.scheduler.run, args=(self.runner,), name="flamingo-engine",
                                            daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread (after its current step); requests still running or waiting end
        with EngineStopped."""
        if self._thread is not None:
            self.scheduler.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def request_stop(self) -> None:
        """Begin stopping without waiting (safe in a signal handler: takes no lock): new requests
        are refused, and the running and waiting ones end with EngineStopped now, without waiting
        for the current step (which may take seconds), so that their responses close at once;
        the engine thread drops them. `stop` then joins the thread after its current step."""
        self.scheduler.request_stop()

    # ------------------------------------------------------------------ requests
    def generate(self, request: EngineRequest, prompt: ProcessedPrompt | None = None) -> AsyncIterator[Delta]:
        """Submit a request; its deltas arrive through the returned iterator. Raises
        EngineOverloaded when the queue is full and a UserError for a bad request, at once.
        `prompt`: the request's prompt already through `processor` (the server does that at
        its door, in steps); else its text and images go through it now."""
        params = request.params
        if not isinstance(params, SamplingParams):
            raise EngineRequestError("params: expected SamplingParams", "params")
        if params.num_beams == 1 and params.n > self.config.max_running:
            raise EngineRequestError(f"n: at most {self.config.max_running} (the engine's concurrent sequences), "
                                     f"got {params.n}", "n")
        if prompt is None:
            prompt = self.processor.prompt(request.text, request.images, params.max_tokens)
        job = Job(prompt, params, asyncio.get_running_loop())
        self.scheduler.submit(job)
        return RequestStream(job.outbox)

    async def rank(self, text: str, images: list[bytes], candidates: list[str],
                   prompt: ProcessedPrompt | None = None) -> list[float]:
        """Total log-likelihood of each candidate continuation of the prompt (`prompt`: as in `generate`)."""
        lengths = self.processor.candidates(candidates)
        if prompt is None:
            prompt = self.processor.prompt(text, images, max(lengths), Fields(new_tokens="candidates"))
        job = Job(prompt, SamplingParams(max_tokens=1), asyncio.get_running_loop(), list(candidates), lengths)
        self.scheduler.submit(job)
        async for scores in RequestStream(job.outbox):  # one item: the scores
            return scores
        raise asyncio.CancelledError
