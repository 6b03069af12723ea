"""Continuous batching: one thread owns the engine; HTTP handlers talk to it through jobs.

:class:`~prefalign.engine.Engine` is not thread-safe, so exactly one thread — the
scheduler's — ever calls ``add``, ``step``, ``cancel`` or ``pop_result``. Handlers
(running on the asyncio event loop) :meth:`Scheduler.submit` a built
:class:`~prefalign.engine.GenerationRequest` and read its events from the returned
:class:`Job`; the scheduler posts events back to the loop with
``call_soon_threadsafe``.

Scheduling, per iteration of the scheduler thread:

1. apply cancellations (client disconnects): a waiting job is dropped, a running one
   is cancelled in the engine, whose rows leave the batch at the next step;
2. admit waiting jobs in FIFO order while fewer than ``max_batch`` run;
3. run one :meth:`Engine.step` — new requests are prefilled and every running request
   advances by one token in the same step — and route its deltas to their jobs.

The thread drives the engine through one long-lived :class:`~prefalign.streaming.Session`
(the same protocol as ``Aligner.stream`` and the evaluation): it adds and cancels
requests, pops each finished request's result with its last delta, and, when the
scheduler stops, cancels whatever is still running.

Requests thus join and leave the running batch between any two tokens. Accepted but
not yet running jobs wait in a queue of at most ``max_queue``; beyond that
:meth:`Scheduler.submit` raises :class:`QueueFullError` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Union

from ..engine import Delta, Engine, GenerationRequest, GenerationResult
from ..streaming import Event as EngineEvent
from ..streaming import Session

log = logging.getLogger("prefalign.server")


class QueueFullError(Exception):
    """The waiting queue is full; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStoppedError(Exception):
    """The scheduler is shutting down and takes no more work."""


class EngineFailure(Exception):
    """The engine raised while running this job's batch (the job cannot continue)."""


Event = Union[Delta, GenerationResult, BaseException]


def _trim_heap() -> None:
    """``malloc_trim(0)``: glibc keeps freed heap (a drained batch's KV caches and
    activations: 240 MB after 16 streams of the embedded model) unless asked to return
    it. A few milliseconds, run only when the engine becomes idle. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _post_all(items: list[tuple[Job, Event]]) -> None:
    """Deliver a step's events with one wake-up per event loop, not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in items:
        by_loop.setdefault(job._loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver_all, batch)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass


def _deliver_all(batch: list[tuple[Job, Event]]) -> None:
    for job, event in batch:
        job._deliver(event)


class Job:
    """One submitted request and the channel its events come back through.

    Events, in order: zero or more :class:`~prefalign.engine.Delta` (only if
    ``stream``), then exactly one terminal event — the
    :class:`~prefalign.engine.GenerationResult` or an exception (validation error from
    ``Engine.add``, :class:`EngineFailure`, :class:`SchedulerStoppedError`). A job
    cancelled by its client gets no terminal event: nobody is listening.
    """

    def __init__(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, *, stream: bool, events: asyncio.Queue[Event] | None = None
    ) -> None:
        self.request = request
        self.stream = stream
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished = False  # a terminal event was posted (read on the loop thread)
        self.cancelled = False
        self._loop = loop
        # The n answers of one HTTP request share one queue (Scheduler.submit_all).
        self._events: asyncio.Queue[Event] = events if events is not None else asyncio.Queue()

    @property
    def id(self) -> str:
        return self.request.request_id

    def post(self, event: Event) -> None:
        """Hand ``event`` to the job's event loop (callable from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass

    def _deliver(self, event: Event) -> None:
        if not isinstance(event, Delta):
            self.finished = True
        self._events.put_nowait(event)

    async def ready(self) -> None:
        """Return once the request is accepted: at once here, where ``submit`` accepted it
        (a job run by a remote replica waits for the replica's word)."""

    async def next_event(self) -> Event:
        """Wait for the next event."""
        return await self._events.get()

    async def next_events(self) -> list[Event]:
        """Wait for the next event and take the ones already delivered behind it."""
        events = [await self._events.get()]
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events


@dataclass
class SchedulerStats:
    """Counters since start (served by ``GET /health``)."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    completion_tokens: int = 0
    engine_resets: int = 0


class Scheduler:
    """Drive ``aligner.engine`` from one background thread with continuous batching.

    ``aligner`` is anything with an ``engine`` attribute (an :class:`Engine`). A request
    that fails on its own is finished by the engine with an error result; only a
    failure of the pass all running requests share fails them all (the engine resets
    itself and goes on serving).
    """

    def __init__(self, aligner: Any, *, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        if max_queue < 0:
            raise ValueError("max_queue must be ≥ 0")
        self.aligner = aligner
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._cancels: list[Job] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Mean seconds a request spends in the engine, for Retry-After.
        self._service_seconds = 1.0
        self._session: Session | None = None
        #: Requests running in the engine, as the scheduler thread last saw them. Other
        #: threads read this, never the engine: Engine.num_active and has_work repair an
        #: interrupted step, and doing that from another thread mid-step drops the running
        #: requests behind the scheduler's back (their clients would wait forever).
        self.engine_active = 0

    @property
    def engine(self) -> Engine:
        return self.aligner.engine

    @property
    def session(self) -> Session:
        """The scheduler thread's session on the engine (opened on first use)."""
        if self._session is None or self._session.closed or self._session.engine is not self.engine:
            self._session = self.engine.session()
        return self._session

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prefalign-scheduler", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop taking work; the thread fails what is queued or running and ends (no wait).

        Safe from a signal handler: ``prefalign serve`` calls it on Ctrl-C, so that open
        streams end at once (with a ``server_shutting_down`` error event) instead of
        holding the shutdown until uvicorn cuts them.
        """
        with self._lock:
            self._stopping = True
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, fail what is queued or running, and join the thread."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("scheduler thread did not stop within %.0f s", timeout)
        self._thread = None

    def is_alive(self) -> bool:
        """Whether the scheduler thread is running (a replica's health check)."""
        return self._thread is not None and self._thread.is_alive()

    # -- called from request handlers -----------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, *, stream: bool) -> Job:
        """Queue ``request``; raises :class:`QueueFullError` when the queue is full."""
        return self.submit_all([request], loop, stream=stream)[0]

    def submit_all(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop, *, stream: bool) -> list[Job]:
        """Queue ``requests`` together (all or none: :class:`QueueFullError`), e.g. the ``n``
        answers of one request (``GenerationRequest.split_choices``). Their events arrive on
        one queue, read with any of the jobs' :meth:`Job.next_event`; admitted together,
        they share one prefill when a batch slot is free for each."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        jobs = [Job(request, loop, stream=stream, events=events) for request in requests]
        with self._lock:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down")
            # Free batch slots are filled at once, so they count as capacity too.
            capacity = self.max_batch + self.max_queue
            if len(self._running) + len(self._waiting) + len(jobs) > capacity:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"the server is busy: {len(self._running)} requests running and {len(self._waiting)} "
                    f"queued (max_batch={self.max_batch}, max_queue={self.max_queue}); retry later",
                    self._retry_after_locked(),
                )
            self._waiting.extend(jobs)
            self.stats.submitted += len(jobs)
            self._wake.set()
        return jobs

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (client went away). Safe to call twice or after it finished."""
        with self._lock:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._wake.set()

    def load(self) -> dict[str, int]:
        """Current running and waiting counts."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def _retry_after_locked(self) -> int:
        # Roughly: how many batch "generations" are ahead of a new request, times the
        # mean time one request spends in the engine. Clamped to a sane range.
        rounds = math.ceil((len(self._waiting) + 1) / self.max_batch)
        return int(min(60, max(1, math.ceil(rounds * self._service_seconds))))

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        was_busy = False
        while True:
            with self._lock:
                if self._stopping:
                    break
                self._apply_cancels_locked()
                self._admit_locked()
                busy = self.engine.has_work
                if not busy:
                    # Cleared under the lock: a submit after this point sets it again,
                    # so no wake-up is lost.
                    self._wake.clear()
            if not busy:
                if was_busy:
                    _trim_heap()  # the batch drained: give its freed KV caches back to the OS
                was_busy = False
                self.engine_active = 0
                self._wake.wait(timeout=1.0)
                continue
            was_busy = True
            try:
                events = self.session.step()
            except BaseException as exc:
                # A bug or resource error in the engine, or any interruption of its step
                # (the engine has reset itself): fail the running jobs and keep serving.
                # Only stop() ends this thread; a signal never reaches it (Python delivers
                # them to the main thread, where uvicorn turns Ctrl-C into a shutdown).
                self._recover(exc)
                continue
            self.stats.steps += 1
            self._dispatch(events)
            self.engine_active = self.engine.num_active
        self._shutdown()

    def _apply_cancels_locked(self) -> None:
        for job in self._cancels:
            if job in self._waiting:
                self._waiting.remove(job)
            elif self._running.pop(job.id, None) is not None:
                # Its rows leave the batch at the next step (Engine.cancel).
                self.session.cancel(job.id)
            else:
                continue  # finished in the meantime
            self.stats.cancelled += 1
        self._cancels.clear()

    def _admit_locked(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            job = self._waiting.popleft()
            try:
                self.session.add(job.request)
            except Exception as exc:  # the handler pre-validates; this is a safety net
                self.stats.failed += 1
                job.post(exc)
                continue
            job.started_at = time.perf_counter()
            self._running[job.id] = job

    def _dispatch(self, events: list[EngineEvent]) -> None:
        done: list[Job] = []
        outbox: list[tuple[Job, Event]] = []
        for event in events:
            delta, result = event.delta, event.result
            job = self._running.get(delta.request_id)
            if job is None:  # cancelled while this step ran: discard its output
                continue
            if job.stream:
                outbox.append((job, delta))
            if delta.finish_reason is not None:
                if result is None:  # should not happen; never leave a client hanging
                    outbox.append((job, EngineFailure("the engine finished the request without a result")))
                else:
                    outbox.append((job, result))
                    self.stats.completion_tokens += result.usage.completion_tokens
                    if result.error is not None:
                        self.stats.failed += 1
                done.append(job)
        _post_all(outbox)
        if done:
            now = time.perf_counter()
            with self._lock:
                for job in done:
                    self._running.pop(job.id, None)
                    self.stats.completed += 1  # finished, successfully or not (see failed)
                    if job.started_at is not None:
                        self._service_seconds = 0.8 * self._service_seconds + 0.2 * (now - job.started_at)

    def _recover(self, exc: BaseException) -> None:
        """The pass that every running request shares raised: the engine has dropped them
        all (Engine.step resets itself), so fail their jobs. Waiting jobs stay."""
        log.error("engine step failed (%s: %s); failing %d running requests", type(exc).__name__, exc, len(self._running))
        with self._lock:
            failed = list(self._running.values())
            self._running.clear()
            self.stats.failed += len(failed)
            self.stats.engine_resets += 1
            self.engine.reset()
        message = f"the engine failed while decoding this request ({type(exc).__name__}: {exc}); please retry"
        for job in failed:
            job.post(EngineFailure(message))

    def _shutdown(self) -> None:
        with self._lock:
            jobs = list(self._running.values()) + list(self._waiting)
            if self._session is not None:
                self._session.close()  # cancels what is still running
            self._running.clear()
            self._waiting.clear()
        for job in jobs:
            job.post(SchedulerStoppedError("the server is shutting down"))
