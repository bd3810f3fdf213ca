"""The control plane's reverse proxy to environments: ``/environments/<id>/``, HTTP and WebSocket.

Backends whose environments the control plane serves itself (the embedded default) say where
each one listens (:meth:`~cmbcluster.interfaces.ComputeBackend.upstream`); the routes in
:mod:`cmbcluster.api.routes.environment_proxy` check the caller first, exactly as the ingress's
``authorize`` does on Kubernetes, then hand the request to :class:`EnvironmentProxy`.

Both directions stream: request and response bodies pass chunk by chunk (httpx), WebSocket
messages one by one (the ``websockets`` client upstream, Starlette's WebSocket downstream), so
memory stays flat whatever the size. What the application must never see is removed: the
control plane's own cookies and bearer tokens, and what the client claims of the forwarding
(``Forwarded``, ``X-Real-IP``, ``X-Forwarded-*``), replaced by what the proxy knows. What the
browser must never see is never sent to it: the application's token travels only from the proxy
to the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection, Request
from starlette.responses import StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from cmbcluster.errors import BadGateway, InvalidRequest
from cmbcluster.interfaces import Upstream
from cmbcluster.security import ORIGIN_WIDE_HEADERS
from cmbcluster.services.sessions import API_TOKEN_PREFIX, SESSION_PREFIX

log = logging.getLogger(__name__)

#: Headers that concern one connection, never forwarded (RFC 9110 7.6.1), and ``expect``, which httpx
#: does not implement.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "expect"}
)  # fmt: skip
#: The WebSocket handshake's own headers: the upstream handshake makes its own.
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol", "origin",
     "host", "content-length"}
)  # fmt: skip
#: What a client says of how its request was forwarded (its address, scheme, host), besides every
#: ``X-Forwarded-*``: never passed on, since an application that reads it would believe the client.
#: The proxy states the facts itself (:func:`_forwarding_facts`).
FORWARDING_CLAIMS = frozenset({"forwarded", "x-real-ip"})
#: Bearer tokens of the control plane (sessions and API tokens): never passed on to an application.
OWN_TOKEN_PREFIXES = (f"{SESSION_PREFIX}_", f"{API_TOKEN_PREFIX}_")
CONNECT_TIMEOUT_SECONDS = 10.0
#: The largest WebSocket message passed on (JupyterLab sends a notebook's outputs in one message).
MAX_WEBSOCKET_MESSAGE = 64 * 1024 * 1024
#: Close codes an endpoint may not send itself (1005 and 1006 only describe what happened).
_RESERVED_CLOSE_CODES = frozenset({1005, 1006, 1015})


#: Bytes read from a socket at a time while streaming. httpcore reads 64 KiB, and asyncio's transports
#: 256 KiB: a 1 GiB download through the proxy then costs one read (and a pass through httpcore, h11 and
#: Starlette) per 64 KiB. Reading 1 MiB at a time took a download from JupyterLab through the proxy
#: from 0.43 to about 0.75 of the direct throughput on 2 cores (tests/benchmarks/bench_proxy.py).
STREAM_READ_BYTES = 1024 * 1024


def tune_for_streaming() -> None:
    """Read sockets in :data:`STREAM_READ_BYTES` blocks: httpcore's ``READ_NUM_BYTES`` (a setting of its
    public connection class) and asyncio's transports' ``max_size`` (every socket of this process,
    uvicorn's too: uploads are read in larger blocks as well). Idempotent."""
    import asyncio.selector_events

    import httpcore

    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, STREAM_READ_BYTES
    )
    transport: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)
    if transport is not None and getattr(transport, "max_size", 0) < STREAM_READ_BYTES:
        transport.max_size = STREAM_READ_BYTES


class _KeepNoCookies(http.cookiejar.DefaultCookiePolicy):
    """The proxy's clients store no cookie: an application's ``Set-Cookie`` is for its owner's browser
    alone. A client's jar would send it with every later request to that host, and every environment
    on loopback is the same cookie host (ports do not count), so another user's application read it."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


class EnvironmentProxy:
    """Forwards requests to environments; one per control plane, closed at shutdown."""

    def __init__(self, *, own_cookies: frozenset[str]) -> None:
        self.own_cookies = own_cookies
        self._own_cookies_lowered = frozenset(cookie.lower() for cookie in own_cookies)
        self._clients: dict[str | None, httpx.AsyncClient] = {}
        tune_for_streaming()

    def _client(self, upstream: Upstream) -> httpx.AsyncClient:
        """One pooled client for every loopback port, one per Unix socket (httpx binds a socket per transport)."""
        client = self._clients.get(upstream.unix_socket)
        if client is None:
            transport = httpx.AsyncHTTPTransport(uds=upstream.unix_socket, retries=0)
            client = httpx.AsyncClient(
                transport=transport, trust_env=False, follow_redirects=False,
                cookies=http.cookiejar.CookieJar(policy=_KeepNoCookies()),
                timeout=httpx.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=None, write=None, pool=None),
            )  # fmt: skip
            for name in list(client.headers):  # send the browser's headers, not httpx's defaults
                del client.headers[name]
            self._clients[upstream.unix_socket] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # -- HTTP ------------------------------------------------------------------------------------
    async def forward(self, request: Request, upstream: Upstream, prefix: str) -> StreamingResponse:
        """Send ``request`` to the environment and stream its answer back (``prefix``: its
        ``/environments/<id>`` path, without the final slash)."""
        target = _target_path(request.scope, upstream, prefix)
        headers = self._request_headers(request, upstream)
        body = request.stream() if _has_body(request) else None
        client = self._client(upstream)
        outgoing = client.build_request(request.method, httpx.URL(upstream.url).copy_with(raw_path=target),
                                        headers=headers, content=body)  # fmt: skip
        try:
            response = await client.send(outgoing, stream=True)
        except httpx.LocalProtocolError as exc:  # what the caller sent cannot be sent on (two Host headers)
            raise InvalidRequest(f"the request cannot be passed on to the environment: {exc}") from None
        except httpx.TimeoutException:
            raise BadGateway("the environment did not answer in time; it may still be starting") from None
        except httpx.TransportError as exc:
            self._forget(upstream)
            raise BadGateway(
                f"the environment does not answer ({type(exc).__name__}); its output may say why"
            ) from None
        answer = StreamingResponse(
            response.aiter_raw(), status_code=response.status_code, background=BackgroundTask(response.aclose)
        )
        answer.raw_headers = self._response_headers(response, upstream, prefix)
        return answer

    def _forget(self, upstream: Upstream) -> None:
        """Drop the client of a Unix socket that failed: the environment may be gone for good."""
        if upstream.unix_socket is not None:
            client = self._clients.pop(upstream.unix_socket, None)
            if client is not None:
                asyncio.get_running_loop().create_task(client.aclose())

    def _request_headers(self, request: Request, upstream: Upstream) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        for name, value in request.headers.raw:
            lowered = name.lower().decode("latin-1")
            if lowered in HOP_BY_HOP or _is_forwarding_claim(lowered):
                continue
            if lowered == "cookie":
                kept = self._without_own_cookies(value.decode("latin-1"))
                if kept:
                    headers.append((name, kept.encode("latin-1")))
                continue
            if lowered == "authorization" and (is_control_plane_credential(value) or upstream.headers):
                continue
            headers.append((name, value))
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in _forwarding_facts(request)]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.items()]
        return headers

    def _without_own_cookies(self, header: str) -> str:
        return without_cookies(header, self.own_cookies)

    def _response_headers(self, response: httpx.Response, upstream: Upstream, prefix: str) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        for name, value in response.headers.raw:
            lowered = name.lower().decode("latin-1")
            if lowered in HOP_BY_HOP or lowered in ORIGIN_WIDE_HEADERS:
                continue
            if lowered == "date":
                continue  # the server states its own (uvicorn adds it to every answer): one, not two
            if lowered == "set-cookie" and self._tosses_own_cookie(value):
                continue  # an application cannot replace the control plane's session
            if (
                lowered == "location"
                and upstream.strip_prefix
                and value.startswith(b"/")
                and not value.startswith(b"//")
            ):
                value = prefix.encode("latin-1") + value
            headers.append((lowered.encode("latin-1"), value))
        return headers

    def _tosses_own_cookie(self, set_cookie: bytes) -> bool:
        """A cookie that is, or could be sent as, one of the control plane's: by its name in any
        case, or nameless (``=cmbcluster_session=...``: some browsers send a nameless cookie as
        its bare value, which the server then reads as that name)."""
        name = _cookie_name(set_cookie)
        if not name:
            return True
        return name.lower() in self._own_cookies_lowered

    # -- WebSocket -------------------------------------------------------------------------------
    async def forward_websocket(
        self,
        websocket: WebSocket,
        upstream: Upstream,
        prefix: str,
        *,
        on_traffic: Callable[[], Awaitable[None]] | None = None,
        revoked: Awaitable[str] | None = None,
    ) -> None:
        """Open the same WebSocket on the environment, then pass messages both ways until either side
        closes, or until ``revoked`` gives why the caller may no longer use it (closed with 1008 and
        that reason). The caller has checked the caller; a refused upstream handshake is a 502."""
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        target = _target_path(websocket.scope, upstream, prefix).decode("latin-1")
        uri = upstream.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + target
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in websocket.headers.raw
            if name.lower().decode("latin-1") not in HOP_BY_HOP | WEBSOCKET_HANDSHAKE
            and not _is_forwarding_claim(name.lower().decode("latin-1"))
            and not (name.lower() == b"authorization" and (is_control_plane_credential(value) or upstream.headers))
        ]
        headers = [
            (name, self._without_own_cookies(value) if name.lower() == "cookie" else value)
            for name, value in headers
            if name.lower() != "cookie" or self._without_own_cookies(value)
        ]
        headers += _forwarding_facts(websocket)
        headers += list(upstream.headers.items())
        options: dict[str, Any] = {
            "additional_headers": headers, "subprotocols": websocket.scope.get("subprotocols") or None,
            # The proxy checked the browser's Origin against the control plane's own; the application
            # is shown its own origin, which its cross-site check accepts.
            "origin": upstream.url, "compression": None, "max_size": MAX_WEBSOCKET_MESSAGE,
            "open_timeout": CONNECT_TIMEOUT_SECONDS, "user_agent_header": None, "proxy": None,
        }  # fmt: skip
        try:
            if upstream.unix_socket is not None:
                options.pop("proxy")
                remote = await unix_connect(upstream.unix_socket, uri, **options)
            else:
                remote = await connect(uri, **options)
        except InvalidStatus as exc:
            raise BadGateway(f"the environment refused the WebSocket (HTTP {exc.response.status_code})") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise BadGateway(
                f"the environment does not answer ({type(exc).__name__}); its output may say why"
            ) from None
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(remote.close)
            await websocket.accept(subprotocol=remote.subprotocol)

            async def browser_to_environment() -> None:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        code = int(message.get("code") or 1000)
                        await remote.close(code=1000 if code in _RESERVED_CLOSE_CODES else code)
                        return
                    if message.get("text") is not None:
                        await remote.send(message["text"])
                    elif message.get("bytes") is not None:
                        await remote.send(message["bytes"])
                    if on_traffic is not None:
                        await on_traffic()

            async def environment_to_browser() -> None:
                try:
                    async for data in remote:
                        if isinstance(data, str):
                            await websocket.send_text(data)
                        else:
                            await websocket.send_bytes(data)
                except ConnectionClosed:
                    pass
                code = remote.close_code or 1000
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await websocket.close(code=1000 if code in _RESERVED_CLOSE_CODES else code)

            async def until_revoked(why: Awaitable[str]) -> None:
                reason = await why
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await websocket.close(code=1008, reason=reason[:120])  # a close reason's limit: 123 bytes

            pumps = [
                asyncio.create_task(browser_to_environment(), name="websocket-browser-to-environment"),
                asyncio.create_task(environment_to_browser(), name="websocket-environment-to-browser"),
            ]
            if revoked is not None:
                pumps.append(asyncio.create_task(until_revoked(revoked), name="websocket-until-revoked"))
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                for task in pumps:
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, WebSocketDisconnect, OSError):
                        await task


def _target_path(scope: Any, upstream: Upstream, prefix: str) -> bytes:
    """The request's raw path (percent-encoding kept: JupyterLab's file paths contain %2F) and query,
    without the environment's prefix for an application that does not know it."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if not raw_path.startswith(prefix.encode("latin-1") + b"/"):
        # routed by the decoded path: with the id or its slash percent-encoded, the address as sent does
        # not start with the prefix, and cutting the prefix's length off it would leave no path
        raise InvalidRequest(
            f"an environment's address starts with {prefix}/ as written: its id and the slash after it"
            " may not be percent-encoded"
        )
    if upstream.strip_prefix:
        raw_path = raw_path[len(prefix) :] or b"/"
    query: bytes = scope.get("query_string") or b""
    if upstream.headers and query:
        # The proxy sends the start's token: a token in the address (a bookmark of an earlier start,
        # JupyterLab's own WebSocket URLs) is left out, or JupyterLab, which reads it first, refuses
        # the request that the proxy's header would let through.
        query = b"&".join(part for part in query.split(b"&") if unquote_to_bytes(part.split(b"=", 1)[0]) != b"token")
    return raw_path + (b"?" + query if query else b"")


def _no_answer(exc: Exception) -> str:
    return f"the environment does not answer ({type(exc).__name__}); its output may say why"


def _has_body(request: Request) -> bool:
    return ("content-length" in request.headers and request.headers["content-length"] != "0") or (
        "transfer-encoding" in request.headers
    )


def _is_forwarding_claim(lowered_name: str) -> bool:
    return lowered_name in FORWARDING_CLAIMS or lowered_name.startswith("x-forwarded-")


def _forwarding_facts(connection: HTTPConnection) -> list[tuple[str, str]]:
    """What the proxy tells an application of the request it passes on, HTTP and WebSocket alike:
    the address it came from, its scheme (``http``/``https``, a WebSocket's too) and its Host."""
    scheme = {"ws": "http", "wss": "https"}.get(connection.url.scheme, connection.url.scheme)
    return [
        ("x-forwarded-for", connection.client.host if connection.client else ""),
        ("x-forwarded-proto", scheme),
        ("x-forwarded-host", connection.headers.get("host", "")),
    ]


def without_cookies(header: str, names: frozenset[str]) -> str:
    """A ``Cookie`` request header without the cookies called ``names``."""
    parts = [part.strip() for part in header.split(";")]
    return "; ".join(p for p in parts if p and p.split("=", 1)[0].strip() not in names)


def is_control_plane_credential(authorization: str | bytes) -> bool:
    """An ``Authorization`` header carrying a CMBCluster session or API token (not the application's own)."""
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip().startswith(OWN_TOKEN_PREFIXES)


def _cookie_name(value: bytes) -> str:
    return value.split(b"=", 1)[0].decode("latin-1").strip()
