"""The HTTP server `cmbcluster serve` runs: uvicorn, with limits uvicorn's fast parser lacks.

uvicorn's httptools protocol collects a request's whole header block before the application sees
any of it: a stranger could send megabytes of headers, or tens of thousands of empty ones, per
connection. :class:`LimitedHttpToolsProtocol` counts them while they arrive and answers 431 as
soon as a request passes :data:`MAX_HEADER_BYTES` or :data:`MAX_HEADERS`, then closes the
connection (the request guard's own check covers any other server). It also gives a request's
headers ``CMBCLUSTER_REQUEST_TIMEOUT_SECONDS`` to arrive, counted from the connection's opening or
the previous answer on it: uvicorn waits for them as long as a client keeps the connection open, so
clients sending a byte now and then (or nothing) could hold every connection the server can take.
The guard times out a request's body the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cmbcluster.api.guard import MAX_HEADER_BYTES
from cmbcluster.settings import CoreSettings

#: Header lines per request (browsers send about 20).
MAX_HEADERS = 100
#: How long a thread keeps the GIL while another waits for it (see :func:`run`).
SWITCH_INTERVAL_SECONDS = 0.0005
#: The garbage collector's thresholds while serving (Python's default: 700, 10, 10); see :func:`run`.
GC_THRESHOLDS = (20_000, 20, 20)
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_BODY = b'{"error": "request_header_fields_too_large", "message": "the request\'s headers are too large"}'
_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = b'{"error": "request_timeout", "message": "the request\'s headers did not arrive in time"}'


class _HeadersTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    #: Seconds a request's headers may take; :func:`run` sets the configured value on a subclass.
    header_timeout_seconds = 30.0
    _header_bytes = 0
    _header_count = 0
    _refused = False
    _header_deadline: asyncio.TimerHandle | None = None
    _request_begun = False  #: a byte of the awaited request arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._stop_waiting_for_headers()
        self._request_begun = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request on this connection
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting_for_headers()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._stop_waiting_for_headers()
        self._header_deadline = self.loop.call_later(self.header_timeout_seconds, self._headers_too_slow)

    def _stop_waiting_for_headers(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request is being answered (pipelined: its turn comes)
        self._refused = True
        if self._request_begun:  # an idle connection is closed as keep-alive closes it: silently
            self.transport.write(_TIMEOUT % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        self._header_bytes = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count(len(name) + len(value) + 4)  # ": " and CRLF: empty headers count too
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES or self._header_count > MAX_HEADERS:
            if not self._refused:
                self._refused = True
                self.transport.write(_REFUSAL % (len(_BODY), _BODY))
                self.transport.close()
            raise _HeadersTooLarge  # stops the parser: nothing more of this request is kept

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request, arriving before the close
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # the parser reports our stop as an invalid request: 431 was sent
            super().send_400_response(msg)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit, and return it. Each open
    progress stream, proxied request and WebSocket is a socket: with the usual soft limit of 1,024
    (a normal user's, and CI's), 1,000 open launch dialogs made ``accept()`` fail with "too many open
    files" and the server stopped taking connections. Raising the soft limit needs no privilege."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # e.g. macOS caps it below the hard limit: keep what there is
            pass
    return soft


def run(application: Any, core: CoreSettings, *, graceful_shutdown_seconds: int | None = None) -> None:
    """Serve ``application`` on the configured address until stopped; on Ctrl-C or SIGTERM, open
    progress streams, downloads and WebSockets get ``graceful_shutdown_seconds`` to end."""
    import gc
    import sys

    import uvicorn

    # The event loop gives up the GIL at every socket and SQLite call; while a worker or the progress
    # hub's thread computes, it gets it back only when that thread's slice ends (5 ms by default).
    # With 1,000 progress streams open, the environment list served about 1.6x more requests a
    # second with 0.5 ms slices (tests/benchmarks/bench_list_environments.py).
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    raise_open_file_limit()
    # What the server built to start (modules, routes, settings, clients) lives as long as it does:
    # frozen, the collector no longer walks it on every pass; and a request allocates a few
    # thousand objects, so the youngest generation is collected every few requests, not every one.
    # With 1,000 progress streams open, the waiting server's CPU fell from 9-10 % to 4-5 % of a core.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    uvicorn.run(
        application, host=core.host, port=core.port, log_config=None, server_header=False,
        loop="asyncio",  # see the httptools note in pyproject.toml: uvloop's tail latency was worse here
        http=type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                  {"header_timeout_seconds": core.request_timeout_seconds}),
        # whose X-Forwarded-For/-Proto to believe: sign-in limits count per client address
        forwarded_allow_ips=core.forwarded_allow_ips, proxy_headers=True,
        timeout_graceful_shutdown=graceful_shutdown_seconds,
    )  # fmt: skip
