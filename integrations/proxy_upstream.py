"""The proxy's side facing the upstream: keep-alive HTTP/1.1 connections, safe by construction.

Not aiohttp's client, nor httpx's: in ``bench/proxy.py``'s comparison of upstream clients,
a minimal uvicorn pass-through at 64 connections took about four times the CPU per
request with aiohttp's client as with this one (asyncio protocols and httptools' C
parser, which the server side already uses), and httpx's far more; the whole proxy has
about 300 µs per request to reach 3,000 requests/s on one core. It does only what a
proxy to one upstream needs:

- it contacts only ``config.upstream``: requests go to its host and port, under its
  path, with the client's path and query appended; no ``HTTP(S)_PROXY`` variable is
  honoured, no cookie is kept, no redirect is followed (a 3xx goes back to the client
  as is, so credentials never travel to a host we were not told about);
- TLS is verified (``ssl.create_default_context()``) unless ``--insecure``;
- bodies are left as they are (no decompression) and relayed as they arrive, with at
  most :data:`HIGH_WATER` bytes buffered per response before reading pauses;
- a response read to its end leaves its connection for the next request; any other
  (a client that left mid-stream, an error) closes it, which tells the upstream to stop.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from stigmergy.integrations.proxy_config import ProxyConfig


class UpstreamError(ConnectionError):
    """The upstream closed the connection early or sent something that is not HTTP/1.1."""


#: Raised for an upstream that cannot be reached, resets, or stops sending in time.
UPSTREAM_ERRORS = (OSError, TimeoutError)  # ssl.SSLError and UpstreamError are OSErrors
#: RFC 9110 section 7.6.1, plus the old proxy-connection: never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
CONNECT_TIMEOUT = 10.0
#: Error bodies up to this size are read whole (to parse and maybe retry); larger ones are relayed.
ERROR_BODY_LIMIT = 1 << 20
#: Bytes of a response buffered before the connection stops reading until the client catches up.
HIGH_WATER = 1 << 16
#: Methods whose request carries a body even when it is empty (``content-length: 0``).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Headers = list[tuple[str, str]]


class UpstreamResponse:
    """A response whose status and headers have arrived; its body is read with :meth:`readany`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_error",
        "_released",
        "_waiter",
        "complete",
        "raw_headers",
        "status",
    )

    def __init__(self, connection: _Connection, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self._connection = connection
        self.status = status
        self.raw_headers = raw_headers
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False  # the whole body has arrived
        self._released = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers]

    async def readany(self) -> bytes:
        """What has arrived of the body (waiting for something if nothing has); b"" at its end."""
        if not self._chunks and not self.complete and self._error is None:
            self._waiter = self._connection.waiter()
            await self._connection.wait(self._waiter)
        if self._chunks:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            if self._buffered > HIGH_WATER:
                self._connection.resume()
            self._buffered = 0
            return data
        if self._error is not None:
            raise self._error
        return b""

    def at_eof(self) -> bool:
        """Whether the body has been read to its end."""
        return self.complete and not self._chunks

    def release(self) -> None:
        """Done: the connection goes back for reuse if the body was read whole, else it is closed.

        Safe to call more than once: only the first call counts.
        """
        if not self._released:
            self._released = True
            self._connection.done(reuse=self.at_eof())

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _end(self, error: BaseException | None = None) -> None:
        if error is None:
            self.complete = True
        elif not self.complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed by httptools as it comes."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._bodiless = False  # answering HEAD: the body a length announces never comes
        self._informational = False  # a 1xx before the real answer: skipped
        self._until_close = False  # no length and not chunked: the body ends when the connection does
        self._reusable = False

    # -- the proxy's side -------------------------------------------------------------------

    async def request(self, data: bytes, bodiless: bool) -> UpstreamResponse:
        """Send one request (head and body in ``data``); returns once the response's head is in."""
        assert self.transport is not None
        self._bodiless, self._reusable, self._response = bodiless, False, None
        head: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._head = head
        self.transport.write(data)
        await self.wait(head)
        return head.result()

    def waiter(self) -> asyncio.Future[None]:
        return self._loop.create_future()

    async def wait(self, future: asyncio.Future[Any]) -> None:
        """Wait for ``future``, at most the upstream timeout since the last byte asked for."""
        expiry = self._loop.call_later(self._upstream.read_timeout, _expire, future)
        try:
            await future
        finally:
            expiry.cancel()

    def done(self, *, reuse: bool) -> None:
        if reuse and self._reusable and not self.closed:
            self._response = None
            self._upstream.idle.append(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without the subclassing
        self._upstream.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # bytes nobody asked for: this connection cannot be trusted again
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._fail(UpstreamError(f"the upstream's answer is not valid HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._upstream.forget(self)
        if self._until_close and exc is None and self._response is not None:
            self._response._end()  # its body was everything up to here
        else:
            self._fail(UpstreamError("the upstream closed the connection before the answer was complete"))

    def _fail(self, error: BaseException) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._response is not None:
            self._response._end(error)

    # -- httptools' callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        raw, self._raw_headers = self._raw_headers, []
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the answer follows
            self._informational = True
            return
        if self._head is None:  # a second answer to one request (raising here fails the parse)
            raise UpstreamError("the upstream sent an answer nobody asked for")
        self._response = response = UpstreamResponse(self, status, raw)
        framed = self._bodiless or status in (204, 304) or _framed(raw)
        self._until_close = not framed
        if self._bodiless:
            response._end()
        if not self._head.done():
            self._head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._bodiless:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        # After a HEAD the parser may still be waiting for a body: never reused.
        self._reusable = not self._bodiless and self._parser.should_keep_alive()
        self._head = None  # the next bytes belong to no request
        if self._response is not None:
            self._response._end()


def _framed(raw: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body's end is marked (a length, or chunked), not the connection's close."""
    for name, value in raw:
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            return True
    return False


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("the upstream sent nothing within the upstream timeout"))


class Upstream:
    """Sends requests to the configured upstream only, over connections kept for reuse."""

    def __init__(self, config: ProxyConfig) -> None:
        self.base = config.upstream
        parts = urlsplit(config.upstream)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        netloc = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = netloc if parts.port is None else f"{netloc}:{parts.port}"
        self._prefix = parts.path.rstrip("/")
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context()
            if config.insecure:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
        self.read_timeout = config.upstream_timeout
        self.idle: list[_Connection] = []  # the most recently used last: it is the likeliest alive
        self.connections: set[_Connection] = set()

    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """``method`` on the upstream's path + ``target`` (a path and query, as the client sent them)."""
        head = [f"{method} {self._prefix}{target} HTTP/1.1\r\nhost: {self._host_header}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        if body or method in _BODY_METHODS:
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        connection = await self._connection()
        try:
            return await connection.request(data, method == "HEAD")
        except BaseException:
            connection.close()
            raise

    async def _connection(self) -> _Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        connecting = loop.create_connection(
            lambda: _Connection(self),
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host if self._tls else None,
        )
        _, connection = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
        return connection

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        for connection in list(self.connections):
            connection.close()
        self.idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing


def forwarded_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as they came, less hop-by-hop ones (and those ``connection`` names)."""
    pairs = list(raw)
    if not any(name.lower() == b"connection" for name, _ in pairs):
        # Compared as bytes: the names are ASCII, and no other latin-1 letter lowers to ASCII.
        return [(name, value) for name, value in pairs if name.lower() not in _HOP_BY_HOP_BYTES]
    dropped = set(HOP_BY_HOP)
    for name, value in pairs:
        if name.lower() == b"connection":
            dropped.update(token.strip().lower() for token in value.decode("latin-1").split(","))
    return [(name, value) for name, value in pairs if name.decode("latin-1").lower() not in dropped]


async def read_error_body(response: UpstreamResponse) -> tuple[bytes, bool]:
    """Up to :data:`ERROR_BODY_LIMIT` bytes of the body, and whether that is all of it."""
    body = bytearray()
    while chunk := await response.readany():
        body += chunk
        if len(body) > ERROR_BODY_LIMIT:
            return bytes(body), False
    return bytes(body), True


def finish(response: UpstreamResponse) -> None:
    """Done with ``response``: a body read to its end frees the connection for reuse; any other closes it.

    Closing is what tells the upstream to stop (a client that left mid-stream).
    Safe to call more than once.
    """
    response.release()


class UpstreamBody:
    """A response body as it arrives: the bytes already read, then the rest."""

    def __init__(self, response: UpstreamResponse, head: bytes = b"") -> None:
        self._response = response
        self._head = head

    def __aiter__(self) -> UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            return head
        chunk = await self._response.readany()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        finish(self._response)
