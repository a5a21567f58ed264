"""The engine's way out: chosen tokens become text (detokenized incrementally, stop strings
applied: `SequenceDecoder`), and text, results and errors reach each request's consumer, in its
own event loop, as `Delta`s through its `RequestStream`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flamingo.inference.generation import Generation, GenerationConfig, SequenceDecoder
from flamingo.model.flamingo import Flamingo
from flamingo.serving.metrics import EngineMetrics
from flamingo.serving.request import END, Job, Outbox

FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


@dataclass
class Delta:
    """One streamed piece of one choice."""

    index: int  # choice index (0..n-1)
    text: str  # new text (may be "")
    finish_reason: str | None  # None while running; "stop" | "length" at the end of that choice
    prompt_tokens: int = 0  # usage, filled on the final delta of each choice
    completion_tokens: int = 0


class RequestStream:
    """The deltas of one request, as an async iterator. Closing it (or the consuming task being
    cancelled, or it being dropped) cancels the request and frees its sequences' slots."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._outbox.queue.get()
        except BaseException:  # cancelled while waiting (client disconnect)
            self._cancel()
            raise
        if item is END:
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
            self._outbox.cancelled = True

    def __del__(self) -> None:
        self._cancel()


class OutputProcessor:
    """Turns what the model runner chose into the requests' streams, and counts it."""

    def __init__(self, model: Flamingo, metrics: EngineMetrics) -> None:
        self.model, self.metrics = model, metrics

    def decoder(self, config: GenerationConfig) -> SequenceDecoder:
        """The incremental detokenizer (and stop-string check) of one choice."""
        return SequenceDecoder(self.model, config, stream=True)

    def token(self, job: Job, choice: int, decoder: SequenceDecoder, token: int) -> bool:
        """One chosen token of one choice: stream the text it completes. True when the choice ended."""
        shown = decoder.add(token)
        self.metrics.generated_tokens.inc()
        self.first_token(job)
        if shown:
            job.outbox.send(Delta(choice, shown, None))
        if decoder.result is None:
            return False
        self.finish(job, choice, decoder.result)
        return True

    def results(self, job: Job, results: list[Generation]) -> None:
        """Whole choices at once (beam search)."""
        self.first_token(job)
        for choice, result in enumerate(results):
            self.metrics.generated_tokens.inc(len(result.token_ids))
            job.outbox.send(Delta(choice, result.text, None))
            self.finish(job, choice, result)

    def scores(self, job: Job, scores: list[float]) -> None:
        """A ranking's answer: one item, then the end."""
        job.outbox.send(scores)
        job.outbox.send(END)

    def fail(self, job: Job, error: BaseException) -> None:
        job.outbox.send(error)
        job.outbox.send(END)

    def first_token(self, job: Job) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.time_to_first_token.observe(job.first_token_at - job.submitted)

    def finish(self, job: Job, choice: int, result: Generation) -> None:
        job.outbox.send(Delta(choice, "", FINISH_REASONS[result.finish_reason], len(job.prompt.ids),
                              len(result.token_ids)))
        job.unfinished_choices -= 1
        if job.unfinished_choices == 0:
            self.metrics.request_latency.observe(time.perf_counter() - job.submitted)
            job.outbox.send(END)
