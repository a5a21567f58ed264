"""The engine's scheduler: the bounded waiting queue, admission into the decode batch, and the
loop of the engine thread.

Policy: prefills come before decode steps (as in vLLM's default scheduler): a request's first
token does not wait for the others' decoding, and the decode batch is as large as it can be.
Waiting requests that fit in the free sequence slots join it, first come first served, up to
`prefill_chunk` at a time (while sequences run, once a quarter of the slots are free: one forward
pass over several prompts is cheaper than one each). Beam search and ranking requests run as a
batch of their own; between their forward passes the decode batch takes a step or admits new
requests, so that a long ranking does not stall the other answers.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Callable

import torch

from flamingo.errors import UserError
from flamingo.serving.metrics import EngineMetrics
from flamingo.serving.model_runner import ModelRunner
from flamingo.serving.output_processor import OutputProcessor
from flamingo.serving.request import EngineOverloaded, EngineStopped, Job

_FAILED = object()


class Scheduler:
    def __init__(self, max_queue: int, max_running: int, prefill_chunk: int, output: OutputProcessor,
                 metrics: EngineMetrics) -> None:
        self.max_queue, self.max_running, self.prefill_chunk = max_queue, max_running, prefill_chunk
        self.output, self.metrics = output, metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # submitted, still referenced (by a consumer)
        self.wake = threading.Condition()
        self.stopping = False

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.requests_rejected.labels("queue_full").inc()
                raise EngineOverloaded(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting.append(job)
            self.jobs.add(job)
            self.metrics.queue_length.set(len(self.waiting))
            self.wake.notify()

    def stop(self) -> None:
        """Let the loop end after its current step."""
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def request_stop(self) -> None:
        """End every submitted request now with EngineStopped (takes no lock: safe in a signal
        handler); the loop ends after its current step."""
        self.stopping = True
        for job in list(self.jobs):
            if not job.cancelled:
                job.outbox.cancelled = True
                job.outbox.send(EngineStopped("the server is shutting down: the request was cancelled"))

    # ------------------------------------------------------------------ the engine thread
    def run(self, runner: ModelRunner) -> None:
        """The engine thread's loop, until `stop`: admit, decode, run the jobs that run alone."""
        def step() -> None:
            if self.guarded(list(dict.fromkeys(s.job for s in runner.running)), runner.decode) is _FAILED:
                runner.clear()

        def between_passes() -> None:
            """Between the forward passes of a ranking or beam search: the decode batch goes on
            (a step), or requests join it, so that one long job does not stall every other
            answer; ranking and beam search jobs wait their turn."""
            joining = self.take(room=self.max_running - len(runner.running), block=False, alone=False)
            if joining:
                self.guarded(joining, lambda: runner.admit(joining))
            elif joining is not None and runner.running:
                step()
            self.metrics.running_sequences.set(len(runner.running))

        with torch.inference_mode():
            while True:
                joining = self.take(room=self.max_running - len(runner.running), block=not runner.running)
                if joining is None:  # stopping
                    break
                if joining:  # prefills first: the next decode step waits until every prompt that fits has joined
                    batched = [j for j in joining if not j.runs_alone]
                    if batched:
                        self.guarded(batched, lambda: runner.admit(batched))
                    for job in [j for j in joining if j.runs_alone]:
                        self.guarded([job], lambda job=job: runner.run_alone(job, between_passes))
                elif runner.running:
                    step()
                self.metrics.running_sequences.set(len(runner.running))
        error = EngineStopped("the server is shutting down: the request was cancelled")
        with self.wake:
            for job in {s.job for s in runner.running} | set(self.waiting):
                job.outbox.send(error)
            self.waiting.clear()

    def take(self, room: int, block: bool, alone: bool = True) -> list[Job] | None:
        """Waiting jobs that fit in `room` free sequence slots, first come first served, at most
        `prefill_chunk` (None: the engine is stopping). Blocks until there is one when `block`.
        Without `alone`, ranking and beam search jobs are passed over (they stay waiting)."""
        with self.wake:
            while block and not self.waiting and not self.stopping:
                self.wake.wait()
            if self.stopping:
                return None
            # While sequences run, wait until a quarter of the slots are free (or all the waiting
            # jobs fit): one forward pass over several prompts is cheaper than one pass each.
            if not block and room < min(len(self.waiting), max(1, self.max_running // 4)):
                return []
            taken, passed_over = [], []
            while self.waiting and len(taken) < self.prefill_chunk:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                if job.runs_alone and not alone:
                    passed_over.append(self.waiting.popleft())
                    continue
                if not job.runs_alone and job.params.n > room:
                    break
                taken.append(self.waiting.popleft())
                room -= 0 if job.runs_alone else job.params.n
            self.waiting.extendleft(reversed(passed_over))
            self.metrics.queue_length.set(len(self.waiting))
            return taken

    def guarded(self, jobs: list[Job], work: Callable[[], object]) -> object:
        """Run `work`; if it fails, its jobs end with the error (a UserError or EngineStopped as it
        is, anything else as an engine error), the result is _FAILED, and the engine goes on
        serving the others."""
        try:
            return work()
        except Exception as error:  # noqa: BLE001 - the consumers get it; the engine keeps serving
            failure = error if isinstance(error, (UserError, EngineStopped)) else RuntimeError(
                f"engine error: {error!r}")
            for job in jobs:
                self.output.fail(job, failure)
            return _FAILED
