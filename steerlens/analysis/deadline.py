"""HTTP calls bounded in total: a wall-clock deadline around the whole response, not each read.

An HTTP client's timeout bounds each socket read, so a server that sends a byte every few seconds (headers or
body) never trips it. `client()` returns an `httpx2.Client` (the openai package's HTTP client) whose every
socket operation, made while a `Deadline` is in force (`with deadline:`), waits at most what is left of it;
when nothing is left the call fails as a timeout (`httpx2.ReadTimeout`, the openai package's
`APITimeoutError`). Reads wait in steps of at most `POLL_S`, so `Deadline.stop()` ends a call from another
thread within that time. The deadline is per thread: threads sharing one client each have their own.
Outside any deadline the client behaves like a plain one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

import httpcore2
import httpx2

POLL_S = 0.5  # longest single wait on a socket read: how soon `stop()` takes effect

_current: ContextVar[Deadline | None] = ContextVar("steerlens_http_deadline", default=None)


class Deadline:
    """`seconds` of wall-clock time from now for every HTTP call made inside `with deadline:` in this thread;
    `stopped` (an event, shared by the deadlines of one client) ends them early."""

    def __init__(self, seconds: float, stopped: threading.Event | None = None) -> None:
        self.end = time.monotonic() + seconds
        self.stopped = stopped or threading.Event()
        self._tokens: list[Token[Deadline | None]] = []

    def left(self) -> float:
        """Seconds left, 0 once stopped or past the end."""
        return 0.0 if self.stopped.is_set() else max(0.0, self.end - time.monotonic())

    def stop(self) -> None:
        """End the calls under this deadline (and its siblings) at their next read, as out of time."""
        self.stopped.set()

    def __enter__(self) -> Deadline:
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        _current.reset(self._tokens.pop())


def client(**kwargs: Any) -> httpx2.Client:
    """An `httpx2.Client` (extra `kwargs` as for it) whose connections keep to the thread's `Deadline`."""
    transport = httpx2.HTTPTransport()
    pool = transport._pool  # httpx2 builds the connection pool; its network backend opens every connection
    pool._network_backend = _Backend(pool._network_backend)
    return httpx2.Client(transport=transport, **kwargs)


def _bounded(timeout: float | None, deadline: Deadline, error: type[Exception]) -> float:
    """The timeout for one socket operation: `timeout`, at most what the deadline has left (`error` if none)."""
    left = deadline.left()
    if left <= 0:
        raise error(_out_of_time(deadline))
    return left if timeout is None else min(timeout, left)


def _out_of_time(deadline: Deadline) -> str:
    return "stopped" if deadline.stopped.is_set() else "no complete response within the deadline"


class _Stream(httpcore2.NetworkStream):
    """A connection whose operations keep to the deadline of the thread using it."""

    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline = _current.get()
        if deadline is None:
            return self._inner.read(max_bytes, timeout)
        until = math.inf if timeout is None else time.monotonic() + timeout
        while True:  # short waits, so that stop() and the deadline end a silent read in time
            left = min(until - time.monotonic(), deadline.left())
            if left <= 0:
                raise httpcore2.ReadTimeout(_out_of_time(deadline))
            try:
                return self._inner.read(max_bytes, min(left, POLL_S))
            except httpcore2.ReadTimeout:
                continue  # nothing arrived and nothing was consumed: wait again

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        deadline = _current.get()
        bounded = timeout if deadline is None else _bounded(timeout, deadline, httpcore2.WriteTimeout)
        self._inner.write(buffer, bounded)  # not retried in steps: a timed-out write may have sent part

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.NetworkStream:
        deadline = _current.get()
        bounded = timeout if deadline is None else _bounded(timeout, deadline, httpcore2.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    """Opens connections as `inner` does, each a `_Stream`; connecting also keeps to the deadline."""

    def __init__(self, inner: httpcore2.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        deadline = _current.get()
        bounded = timeout if deadline is None else _bounded(timeout, deadline, httpcore2.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        deadline = _current.get()
        bounded = timeout if deadline is None else _bounded(timeout, deadline, httpcore2.ConnectTimeout)
        return _Stream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
