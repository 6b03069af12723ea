"""Connection limits uvicorn does not have: a request-head deadline and connection caps.

uvicorn closes a connection that stays idle *after* a response (``timeout_keep_alive``),
but nothing bounds a connection that never finishes its request head: a client sending
its headers at 1 byte/s, or one that connects and stays silent, holds a socket (and a
file descriptor) forever, and enough of them stop the server from accepting anyone.
uvicorn's ``limit_concurrency`` does not help: it is checked only once a head is
complete, and counts those silent sockets against honest clients.

:func:`guarded_protocol` returns a subclass of uvicorn's own HTTP protocol (httptools
when installed, else h11, as uvicorn's ``auto``) that adds, per connection:

* a **head deadline**: from the moment the server waits for a request head (the
  connection was accepted, or the previous response finished) the whole head must
  arrive within ``head_timeout`` seconds, or the connection is closed (with a 408 if
  it had sent anything). The body has its own limit in the app (``body_timeout``);
* a **head size cap** (``max_head_bytes``; h11 has one, httptools does not);
* the ``prefalign.abort`` scope extension: a callable that drops the connection at
  once, buffered output included (the app's idle-stream timeout uses it: a client that
  does not read would never let a plain close finish);
* a bounded kernel **send buffer** (``send_buffer_bytes``; Linux otherwise grows it to
  4 MiB), so that a client that stops reading is noticed after ~``send_buffer_bytes``
  × 2 + 64 KiB (asyncio's buffer) + its own receive buffer, not after megabytes;
* **connection caps**: beyond ``max_connections`` open connections in all, or
  ``max_connections_per_ip`` from one client address, a new connection is answered
  503 and closed at once, before anything is read.

Pass it as ``uvicorn.Config(app, http=guarded_protocol(limits), timeout_keep_alive=
limits.keep_alive_timeout)``; :func:`uvicorn_settings` returns both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("prefalign.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold (see the module docstring).

    ``0`` turns a cap off (``max_connections``, ``max_connections_per_ip``).
    """

    head_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_head_bytes: int = 32 * 1024
    max_connections: int = 512
    max_connections_per_ip: int = 128
    send_buffer_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not self.head_timeout > 0 or not self.keep_alive_timeout > 0:
            raise ValueError("head_timeout and keep_alive_timeout must be > 0 seconds")
        if self.max_head_bytes < 1024 or min(self.max_connections, self.max_connections_per_ip, self.send_buffer_bytes) < 0:
            raise ValueError("max_head_bytes must be ≥ 1024; connection caps and send_buffer_bytes ≥ 0 (0: none/OS default)")


def _raw_response(status: int, reason: str, message: str, code: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n".encode() + extra + b"\r\n" + body
    )


class _Warnings:
    """At most one warning per kind every ``every`` seconds: a flood must not flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) >= self.every:
            skipped = self.suppressed.pop(kind, 0)
            log.warning(message + (f" ({skipped} more since the last such line)" if skipped else ""), *args)
            self._last[kind] = now
        else:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1


class _GuardMixin:
    """Adds the head deadline, head size cap and connection caps to a uvicorn protocol.

    Relies only on what both of uvicorn's HTTP/1.1 protocols share: ``connections``,
    ``client``, ``transport``, ``loop`` and ``cycle`` (a new cycle starts when a request
    head is complete; ``cycle.response_complete`` once its answer is sent).
    """

    limits: ConnectionLimits = ConnectionLimits()
    warnings: _Warnings = _Warnings()
    # Set by uvicorn's protocols; declared for the type checker.
    connections: set[Any]
    client: tuple[str, int] | None
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    _head_timer: asyncio.TimerHandle | None = None
    _head_wait_cycle: Any = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        refusal = self._over_cap()
        if refusal is not None:
            self.warnings.warn("cap", "refused a connection from %s: %s", self.client[0] if self.client else "?", refusal)
            transport.write(_raw_response(503, "Service Unavailable", refusal + "; retry later", "too_many_connections", b"retry-after: 1\r\n"))
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if self.limits.send_buffer_bytes and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
            except OSError:  # not a TCP socket (a Unix socket, a test transport): keep the default
                pass
        self._arm_head_timer()

    def _over_cap(self) -> str | None:
        limits = self.limits
        if limits.max_connections and len(self.connections) > limits.max_connections:
            return f"the server has {limits.max_connections} connections open (serve --max-connections)"
        if limits.max_connections_per_ip and self.client:
            host = self.client[0]
            mine = sum(1 for c in self.connections if (getattr(c, "client", None) or ("",))[0] == host)
            if mine > limits.max_connections_per_ip:
                return f"{host} has {limits.max_connections_per_ip} connections open (serve --max-connections-per-ip)"
        return None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_wait_cycle = self.cycle
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        # A head completed since the timer was armed (a new cycle began): nothing to do.
        if self.cycle is not self._head_wait_cycle or not self._awaiting_head() or self.transport.is_closing():
            return
        client = self.client[0] if self.client else "?"
        if self._head_bytes:
            self.warnings.warn("slow", "closed a connection from %s: its request head did not arrive within %g s", client, self.limits.head_timeout)
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request head did not arrive within {self.limits.head_timeout:g} s", "request_timeout"
            ))
        else:
            log.debug("closed a silent connection from %s after %g s", client, self.limits.head_timeout)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        waiting, before = self._awaiting_head(), self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:
            self._tag_scope()
        if waiting and self._awaiting_head() and self.cycle is self._head_wait_cycle:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes and not self.transport.is_closing():
                self.warnings.warn("big", "closed a connection from %s: request head over %d bytes", self.client[0] if self.client else "?", self.limits.max_head_bytes)
                self.transport.write(_raw_response(
                    431, "Request Header Fields Too Large", f"the request head is over {self.limits.max_head_bytes} bytes", "request_too_large"
                ))
                self.transport.close()

    def _tag_scope(self) -> None:
        # The request's task starts on the next loop iteration: the scope can still be completed.
        if self.cycle is not None:
            self.cycle.scope.setdefault("extensions", {})["prefalign.abort"] = self.transport.abort

    def on_response_complete(self) -> None:
        before = self.cycle
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is not before:
            self._tag_scope()  # a pipelined request started
        if not self.transport.is_closing() and self._awaiting_head():
            self._arm_head_timer()  # the next head has the same deadline as the first

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)  # type: ignore[misc]


def guarded_protocol(limits: ConnectionLimits | None = None, *, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``, default as uvicorn's ``auto``) with ``limits``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"Guarded{base.__name__}", (_GuardMixin, base), {"limits": limits or ConnectionLimits(), "warnings": _Warnings()})


def uvicorn_settings(limits: ConnectionLimits | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that apply ``limits``."""
    limits = limits or ConnectionLimits()
    return {
        "http": guarded_protocol(limits),
        # uvicorn's own idle timeout between requests on a kept-alive connection.
        "timeout_keep_alive": limits.keep_alive_timeout,
        # h11's own cap on an incomplete head (used when httptools is not installed).
        "h11_max_incomplete_event_size": limits.max_head_bytes,
    }
