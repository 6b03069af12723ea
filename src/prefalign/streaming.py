"""Streaming from the engine: submit, read events, and cancel whatever is left unread.

:meth:`Engine.session() <prefalign.engine.Engine.session>` is the one way the API
(``Aligner.stream``), the evaluation (``BatchExecutor``) and the server's scheduler
drive the engine::

    with engine.session(requests) as session:
        for event in session:            # steps the engine until these requests finish
            print(event.delta.text, end="")
            if event.result is not None:  # a request's last event carries its result
                ...

A session owns the requests submitted through it: it pops each one's result when it
finishes (so nothing is left behind in the engine), and however the block ends —
every request finished, ``break``, an exception, the generator closed — it cancels
those still unfinished, so the engine stays usable for the next caller. The server
keeps one session open for its lifetime and :meth:`Session.add`s / :meth:`Session.cancel`s
requests as clients come and go, stepping it with :meth:`Session.step`.

Not thread-safe (neither is the engine): one thread drives a session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Delta, Engine, GenerationRequest, GenerationResult


@dataclass
class Event:
    """What one step produced for one request: a delta, and on its last one its result."""

    delta: Delta
    result: GenerationResult | None = None

    @property
    def request_id(self) -> str:
        return self.delta.request_id

    @property
    def finish_reason(self) -> str | None:
        return self.delta.finish_reason


class Session:
    """Requests submitted to an engine, streamed until they finish or the session closes."""

    def __init__(self, engine: Engine, requests: Iterable[GenerationRequest] = ()) -> None:
        self.engine = engine
        self._open: dict[str, None] = {}  # unfinished requests, in submission order
        self.closed = False
        try:
            self.submit(requests)
        except BaseException:  # e.g. Ctrl-C half-way: cancel what was queued (no `with` has started yet)
            self.close()
            raise

    def submit(self, requests: Iterable[GenerationRequest]) -> list[str]:
        """Queue ``requests``; every one is validated before any is queued."""
        requests = list(requests)
        if self.closed:
            raise RuntimeError("this session is closed")
        for request in requests:
            self.engine.validate(request)
        for request in requests:
            # Owned before it is queued: an interruption in between still cancels it on close().
            self._open[request.request_id] = None
            self.engine.add(request)
        return [r.request_id for r in requests]

    def add(self, request: GenerationRequest) -> str:
        """Queue one request (validated first)."""
        return self.submit([request])[0]

    def cancel(self, request_id: str) -> None:
        """Drop one of this session's requests; its rows leave the batch at the next step."""
        if self._open.pop(request_id, "absent") is None:
            self.engine.cancel(request_id)
        self.engine.pop_result(request_id)

    @property
    def unfinished(self) -> list[str]:
        """This session's requests still queued or running."""
        return list(self._open)

    def step(self) -> list[Event]:
        """One engine step; the events of this session's requests (others' are not ours).

        If the step raises, or is interrupted (Ctrl-C: any ``BaseException``), the engine
        has reset itself (no request survives it): the session forgets its requests and
        the exception propagates. The next call on the engine answers as a fresh one would.
        """
        try:
            deltas = self.engine.step()
        except BaseException:
            self._open.clear()
            raise
        events = []
        for delta in deltas:
            if delta.request_id not in self._open:
                continue
            result = None
            if delta.finish_reason is not None:
                result = self.engine.pop_result(delta.request_id)
                del self._open[delta.request_id]
            events.append(Event(delta, result))
        return events

    def __iter__(self) -> Iterator[Event]:
        """Step until every request of this session has finished (or left the engine)."""
        while self._prune():
            yield from self.step()

    def _prune(self) -> bool:
        """Forget requests the engine no longer holds (e.g. cancelled on the engine directly)."""
        for rid in [rid for rid in self._open if not self.engine.holds(rid)]:
            del self._open[rid]
            self.engine.pop_result(rid)
        return bool(self._open)

    def close(self) -> None:
        """Cancel every unfinished request (rows and runner memory freed now); idempotent."""
        self.closed = True
        for rid in list(self._open):
            self.engine.cancel(rid)
            self.engine.pop_result(rid)
        self._open.clear()
        self.engine.apply_cancellations()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Event", "Session"]
