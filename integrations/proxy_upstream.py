"""The proxy's side facing the upstream: one aiohttp session, safe by construction.

aiohttp, not httpx: behind uvicorn on this 2-core machine a pass-through with an
httpx client collapsed to a few hundred requests/s at 64 connections, while
aiohttp's client kept thousands (numbers in bench/proxy.py's note). The session:

- contacts only ``config.upstream``: requests are built from its base URL plus the
  client's path, never from a client-supplied host, and no ``HTTP(S)_PROXY``
  variable is honoured;
- verifies TLS unless ``--insecure``, follows no redirect (a 3xx goes back to the
  client as is, so credentials never travel to a host we were not told about),
  keeps no cookies between clients;
- leaves bodies as they are (no decompression) and reads them in bounded chunks
  (aiohttp's 64 KiB buffer), so a stream is relayed as it arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import aiohttp
from yarl import URL

from stigmergy.integrations.proxy_config import ProxyConfig

#: Raised for an upstream that cannot be reached, resets, or stops sending in time.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)
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

Headers = list[tuple[str, str]]


class Upstream:
    """Sends requests to the configured upstream only; the session is made on first use, in the loop."""

    def __init__(self, config: ProxyConfig) -> None:
        self.base = config.upstream
        self._insecure = config.insecure
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT, sock_read=config.upstream_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, ssl=not self._insecure)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> aiohttp.ClientResponse:
        """``method`` on ``base + target`` (a path and query, as the client sent them)."""
        if self._session is None:
            self._session = self._open()
        return await self._session.request(
            method,
            URL(self.base + target, encoded=True),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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


async def read_error_body(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Up to :data:`ERROR_BODY_LIMIT` bytes of the body, and whether that is all of it."""
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > ERROR_BODY_LIMIT:
            return bytes(body), False
    return bytes(body), True


def finish(response: aiohttp.ClientResponse) -> None:
    """Done with ``response``: a body read to its end frees the connection for reuse; any other closes it.

    Closing is what tells the upstream to stop (a client that left mid-stream).
    Safe to call more than once.
    """
    if response.content.at_eof():
        response.release()
    else:
        response.close()


class UpstreamBody:
    """A response body as it arrives: the bytes already read, then the rest."""

    def __init__(self, response: aiohttp.ClientResponse, head: bytes = b"") -> None:
        self._response = response
        self._head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        finish(self._response)
