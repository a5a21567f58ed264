"""The engine's record of one submitted request, as the scheduler, the model runner and the output
processor share it, with its channel back to the consumer."""

from __future__ import annotations

import asyncio
import time

from flamingo.serving.input_processor import ProcessedPrompt, SamplingParams

END = object()  # the last item of a request's stream


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is stopping (the server shuts down): the request was not run, or was cut short (HTTP 503)."""


class Outbox:
    """The channel from the engine thread to one request's consumer, in the consumer's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the consumer's side; read by the engine thread

    def send(self, item: object) -> None:
        """From the engine thread: hand a Delta, a result, an exception or END to the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


class Job:
    """A submitted request: its processed prompt, its options (and candidates, for a ranking), its
    channel back to its consumer's loop, and its timings."""

    def __init__(self, prompt: ProcessedPrompt, params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 candidates: list[str] | None = None, candidate_tokens: list[int] | None = None) -> None:
        self.prompt, self.params = prompt, params
        self.candidates, self.candidate_tokens = candidates, candidate_tokens  # a ranking: its candidates' lengths
        self.outbox = Outbox(loop)
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.unfinished_choices = params.n

    @property
    def cancelled(self) -> bool:
        """Whether its consumer went away (or the engine is stopping)."""
        return self.outbox.cancelled

    @property
    def runs_alone(self) -> bool:
        """Ranking and beam search run as a batch of their own, not in the decode batch."""
        return self.candidates is not None or self.params.num_beams > 1
