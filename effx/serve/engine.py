"""The engines behind ``effx serve``: one worker thread owns the model and decodes the requests handed to
it; the HTTP side submits requests and reads their tokens as events.

* :class:`ContinuousEngine` batches continuously: between two decode steps, waiting requests are
  prefilled one by one and join the running batch (:class:`effx.serve.batch.Batch`), and finished or
  cancelled rows leave it, so a short request never waits for a long one to end. It runs the plans whose
  every token is one plain step of the whole model (dense, quantized, static neuron masks, reduced heads),
  on the torch backend or an artifact's ONNX Runtime backend.
* :class:`SerialEngine` runs any other source (drafting, early exits, token drop, per-prompt neurons,
  cascades) one request at a time through its own ``generate``, exactly as ``effx generate`` does.

Both bound the waiting queue (:class:`QueueFull` when it is full) and the rows decoded at once, stop a
cancelled request between steps, and report to :class:`effx.serve.metrics.Metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..arrays import new_rng
from ..runtime.backend import Backend
from ..runtime.loop import stop_and_pad
from ..runtime.sampling import Sampler
from ..runtime.stats import DecodeStats
from .batch import Batch, prefill_row
from .metrics import Metrics

__all__ = [
    "ContinuousEngine",
    "Engine",
    "Event",
    "Handle",
    "QueueFull",
    "Request",
    "SerialEngine",
    "batchable",
]

log = logging.getLogger(__name__)

Reason = Literal["stop", "length", "cancelled", "error"]


class QueueFull(Exception):
    """The waiting queue is full: answer 429 and ask the client to retry later."""


@dataclass(frozen=True)
class Request:
    """What to generate: the prompt's token ids, at most ``max_new`` tokens, how to sample (greedy when
    ``sampler.do_sample`` is False), the seed of a sampled request's own random source, and
    ``ignore_eos``: generate ``max_new`` tokens whatever they are (vLLM's option, for load tests)."""

    prompt: list[int]
    max_new: int
    sampler: Sampler = field(default_factory=Sampler)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Event:
    """A new ``token`` (``reason`` None), or the end of the request: ``reason`` is ``stop`` (a stop token),
    ``length`` (``max_new`` reached), ``cancelled`` or ``error`` (with ``error``, the message)."""

    token: int | None = None
    reason: Reason | None = None
    error: str | None = None


class Handle:
    """A submitted request: the engine calls ``sink`` with its events, from the worker thread;
    :meth:`cancel` stops it before the next step."""

    def __init__(self, request: Request, sink: Callable[[Event], object]) -> None:
        self.request, self.sink = request, sink
        self.cancelled = self.stopped = False
        self.submitted = time.perf_counter()
        self.generated = 0
        self.last = self.submitted

    def cancel(self, *, stopped: bool = False) -> None:
        """Stop the request before the next step: its client went away, or (``stopped``) its text met a
        stop string, which ends it as a stop token would (not counted as a cancellation)."""
        if not self.cancelled:
            self.stopped = stopped
        self.cancelled = True


def batchable(backend: Any) -> bool:
    """Whether continuous batching can run this backend's plan: a Backend whose plan decodes every token as
    one plain step of every layer (no drafts, exits, prefill of its own, or rollback)."""
    if not isinstance(backend, Backend):
        return False
    plan = backend.plan
    if plan.speculative or plan.rollback:
        return False
    return all(t.prefill is None and t.decoder is None for t, _ in plan.used_techniques)


class Engine:
    """The queue, the worker thread and its life; subclasses decode in :meth:`_work`."""

    kind = "engine"

    def __init__(self, *, max_batch: int, max_queue: int, metrics: Metrics) -> None:
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self._waiting: deque[Handle] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ended = False

    @property
    def alive(self) -> bool:
        """Whether the engine decodes: started, and its loop has not ended."""
        return self._thread is not None and self._thread.is_alive() and not self._ended

    def start(self) -> None:
        """Decode on a new thread. Best only where no other thread of the process has run OpenMP work (see
        :meth:`run`)."""
        self._thread = threading.Thread(target=self.run, name="effx-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Decode on the calling thread until :meth:`close`.

        Call it on the thread that loaded the model (:func:`effx.serve.server.start` does): GNU OpenMP keeps
        a pool of threads per thread that ran parallel work, and once the pools hold more threads than the
        CPU has cores, it stops spinning between parallel regions and puts its threads to sleep at each
        one. A step of SmolLM2 runs hundreds of short regions: decoding on a second thread after loading on
        the first took 19-23 ms a step instead of 7-8 ms on 2 cores."""
        self._thread = threading.current_thread()
        try:
            self._main()
        finally:
            self._ended = True

    def close(self) -> None:
        """Stop decoding (waiting requests are answered with an error) and wait for the loop to end."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def submit(self, request: Request, sink: Callable[[Event], object]) -> Handle:
        """Queue ``request``; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        handle = Handle(request, sink)
        with self._wake:
            self._purge()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(handle)
            self.metrics.queue_length.set(len(self._waiting))
            self._wake.notify()
        return handle

    def _purge(self) -> None:
        """End the waiting requests whose client went away (the caller holds the lock), so that they hold
        no place in the queue."""
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self._end(handle, "cancelled")
        self.metrics.queue_length.set(len(self._waiting))

    def _next_waiting(self, block: bool) -> Handle | None:
        """The oldest waiting request (``block``: wait for one), None when there is none or on close."""
        with self._wake:
            while block and not self._waiting and not self._stopping:
                self._wake.wait()
            if self._stopping or not self._waiting:
                return None
            handle = self._waiting.popleft()
            self.metrics.queue_length.set(len(self._waiting))
            return handle

    def _main(self) -> None:
        while not self._stopping:
            self._work()
        with self._wake:
            while self._waiting:
                self._waiting.popleft().sink(Event(reason="error", error="the server is shutting down"))

    def _work(self) -> None:
        raise NotImplementedError

    # -- what every engine reports ------------------------------------------------------------------------
    def _emit(self, handle: Handle, token: int) -> None:
        now = time.perf_counter()
        if handle.generated == 0:
            self.metrics.time_to_first_token.observe(now - handle.submitted)
        else:
            self.metrics.inter_token_latency.observe(now - handle.last)
        handle.generated += 1
        handle.last = now
        self.metrics.completion_tokens.inc()
        handle.sink(Event(token=token))

    def _end(self, handle: Handle, reason: Reason, error: str | None = None) -> None:
        if reason == "cancelled" and not handle.stopped:
            self.metrics.cancelled.inc()
        handle.sink(Event(reason=reason, error=error))


@dataclass
class _Row:
    handle: Handle
    token: int  # the last token, fed to the next step
    rng: Any


class ContinuousEngine(Engine):
    """Continuous batching over ``backend`` (a plan that :func:`batchable` accepts): between steps, rows
    that finished or were cancelled leave and waiting requests join, up to ``max_batch`` rows. The cache
    starts with ``initial_slots`` slots and grows up to ``capacity`` (default: the model's positions); a
    request longer than that is refused."""

    kind = "continuous batching"

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int,
        max_queue: int,
        metrics: Metrics,
        capacity: int | None = None,
        initial_slots: int = 256,
    ) -> None:
        super().__init__(max_batch=max_batch, max_queue=max_queue, metrics=metrics)
        self.backend = backend
        self.eos = set(stop_and_pad(backend.plan, None, None)[0])
        self.capacity = backend.plan.model.max_positions if capacity is None else capacity
        self.batch = Batch(backend, self.capacity, initial=initial_slots)
        self.rows: list[_Row] = []

    def _work(self) -> None:
        with self.backend.compute():
            try:
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # a failed step fails its rows, not the server
                log.exception("decode step failed")
                for row in self.rows:
                    self._end(row.handle, "error", f"decoding failed: {e}")
                self.rows = []
                self.batch.keep([])
            self.metrics.batch_size.set(len(self.rows))

    def _admit(self) -> None:
        """Prefill waiting requests, one at a time, while the batch has room; block when idle."""
        while len(self.rows) < self.max_batch:
            handle = self._next_waiting(block=not self.rows)
            if handle is None:
                return
            if handle.cancelled:
                self._end(handle, "cancelled")
                continue
            request = handle.request
            if len(request.prompt) + request.max_new > self.capacity:
                self._end(
                    handle, "error", f"the prompt and max_new exceed the {self.capacity} slots of a row"
                )
                continue
            try:
                logits, cache = prefill_row(self.backend, request.prompt)
                rng = new_rng(self.backend.xp, request.seed) if request.sampler.do_sample else None
                token = int(request.sampler(logits, rng)[0])
            except Exception as e:
                log.exception("prefill failed")
                self._end(handle, "error", f"prefill failed: {e}")
                continue
            self.metrics.prompt_tokens.inc(len(request.prompt))
            row = _Row(handle, token, rng)
            if self._emit_and_finish(row):
                continue
            self.batch.join(cache, len(request.prompt))
            self.rows.append(row)

    def _emit_and_finish(self, row: _Row) -> bool:
        """Emit the row's new token; True when the row is done (and told so)."""
        handle = row.handle
        self._emit(handle, row.token)
        if row.token in self.eos and not handle.request.ignore_eos:
            self._end(handle, "stop")
        elif handle.generated >= handle.request.max_new:
            self._end(handle, "length")
        else:
            return False
        return True

    def _step(self) -> None:
        """Drop cancelled rows (and waiting requests), decode one token for the others, and let finished
        rows leave."""
        with self._wake:
            self._purge()
        live = [i for i, row in enumerate(self.rows) if not row.handle.cancelled]
        for row in self.rows:
            if row.handle.cancelled:
                self._end(row.handle, "cancelled")
        self._keep(live)
        if not self.rows:
            return
        self.metrics.step_batch_size.observe(len(self.rows))
        stats = DecodeStats()
        logits = self.batch.step([row.token for row in self.rows], stats)
        self.metrics.record(stats)
        greedy = self.backend.xp.argmax(logits, axis=-1)
        going = []
        for i, row in enumerate(self.rows):
            sampler = row.handle.request.sampler
            token = sampler(logits[i : i + 1], row.rng)[0] if sampler.do_sample else greedy[i]
            row.token = int(token)
            if not self._emit_and_finish(row):
                going.append(i)
        self._keep(going)

    def _keep(self, index: list[int]) -> None:
        self.rows = [self.rows[i] for i in index]
        self.batch.keep(index)


class SerialEngine(Engine):
    """One request at a time through the source's own ``generate`` (``Program.generate`` or an artifact's):
    every pipeline, and the same tokens as ``effx generate``."""

    kind = "one request at a time"

    def __init__(self, runnable: Any, *, max_queue: int, metrics: Metrics) -> None:
        super().__init__(max_batch=1, max_queue=max_queue, metrics=metrics)
        self.runnable = runnable

    def _work(self) -> None:
        handle = self._next_waiting(block=True)
        if handle is None:
            return
        if handle.cancelled:
            self._end(handle, "cancelled")
            return
        request, run = handle.request, self.runnable
        self.metrics.prompt_tokens.inc(len(request.prompt))
        self.metrics.batch_size.set(1)
        sampler = request.sampler
        stats = DecodeStats()
        try:
            run.generate(
                run.batch(request.prompt),
                max_new_tokens=request.max_new,
                do_sample=sampler.do_sample,
                temperature=sampler.temperature,
                top_k=sampler.top_k,
                top_p=sampler.top_p,
                seed=request.seed,
                **({"eos_token_id": []} if request.ignore_eos else {}),
                on_token=lambda token: self._emit(handle, int(token[0])),
                stop=lambda tokens: [handle.cancelled],
                stats=stats,
            )
        except Exception as e:
            log.exception("generate failed")
            self._end(handle, "error", f"generation failed: {e}")
            return
        finally:
            self.metrics.batch_size.set(0)
            self.metrics.record(stats)
        if handle.cancelled:
            self._end(handle, "cancelled")
        else:
            self._end(handle, "length" if handle.generated >= request.max_new else "stop")
