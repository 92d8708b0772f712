"""The proxy's own HTTP plumbing: its upstream connections against scripted servers, and its corked writes.

Each upstream test serves raw HTTP/1.1 from a bare asyncio server on 127.0.0.1, so what the
upstream sends (framing, early closes, 1xx, silence, TLS) is exactly what the test says.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trustme

from stigmergy.integrations.proxy_config import ProxyConfig
from stigmergy.integrations.proxy_server import CorkedTransport
from stigmergy.integrations.proxy_upstream import (
    HIGH_WATER,
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamError,
    read_error_body,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the proxy runs on asyncio only


Answer = Callable[[bytes, asyncio.Transport], None]


class Scripted(asyncio.Protocol):
    """Answers each complete request head (bodies are small and come with it) with ``answer``."""

    def __init__(self, answer: Answer, log: list[bytes], transports: list[asyncio.Transport]) -> None:
        self.answer, self.log, self.transports = answer, log, transports
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            request, self.buffer = head + b"\r\n\r\n" + rest[:length], rest[length:]
            self.log.append(request)
            self.answer(request, self.transport)


@asynccontextmanager
async def scripted(
    answer: Answer, *, tls: ssl.SSLContext | None = None, path: str = ""
) -> AsyncIterator[tuple[str, list[bytes], list[asyncio.Transport]]]:
    """Serve ``answer`` on a free port; yields the base URL, the requests seen and the connections."""
    log: list[bytes] = []
    transports: list[asyncio.Transport] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: Scripted(answer, log, transports), "127.0.0.1", 0, ssl=tls
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}", log, transports
    finally:
        server.close()
        for transport in transports:
            transport.abort()


def upstream(url: str, **options: object) -> Upstream:
    return Upstream(ProxyConfig(upstream=url, **options))  # type: ignore[arg-type]


def ok(body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\n" + head + b"content-length: %d\r\n\r\n" % len(body) + body


async def read_all(
    client: Upstream, method: str = "POST", target: str = "/v1/x", body: bytes = b"{}"
) -> bytes:
    response = await client.send(method, target, [("content-type", "application/json")], body)
    data, whole = await read_error_body(response)
    assert whole
    response.release()
    return data


async def test_requests_go_under_the_upstreams_path_with_its_host_and_connections_are_reused() -> None:
    async with scripted(lambda _, t: t.write(ok(b"hi")), path="/base/") as (url, log, transports):
        client = upstream(url)
        assert await read_all(client, target="/v1/chat?x=1") == b"hi"
        assert await read_all(client, method="GET", body=b"") == b"hi"
        await client.aclose()
    port = url.split(":")[2].split("/")[0]
    first, second = log
    assert first.startswith(b"POST /base/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() + b"\r\n")
    assert b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}" in first
    assert second.startswith(b"GET /base/v1/x HTTP/1.1\r\n") and b"content-length" not in second
    assert len(transports) == 1  # one keep-alive connection for both


async def test_every_framing_of_a_body_is_read_whole() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"

    def answer(request: bytes, transport: asyncio.Transport) -> None:
        if b"/chunked" in request:
            transport.write(chunked)
        else:
            transport.write(until_close)
            transport.close()

    async with scripted(answer) as (url, _, transports):
        client = upstream(url)
        assert await read_all(client, target="/chunked") == b"abcde"
        assert await read_all(client, target="/until-close") == b"until the end"
        assert await read_all(client, target="/chunked") == b"abcde"  # on a new connection
        await client.aclose()
    assert len(transports) == 2


async def test_head_answers_and_informational_answers_do_not_hang() -> None:
    def answer(request: bytes, transport: asyncio.Transport) -> None:
        if request.startswith(b"HEAD"):
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        else:
            transport.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + ok(b"after hints"))

    async with scripted(answer) as (url, _, _transports):
        client = upstream(url)
        response = await asyncio.wait_for(client.send("HEAD", "/v1/x", [], b""), 5)
        assert (response.status, await response.readany()) == (200, b"")
        response.release()
        response = await asyncio.wait_for(client.send("POST", "/v1/x", [], b"{}"), 5)
        assert response.status == 200 and ("link", "</x>") not in response.headers
        assert await response.readany() == b"after hints"
        response.release()
        await client.aclose()


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_its_body() -> None:
    chunk, chunks = b"x" * (1 << 20), 64  # 64 MiB: more than the kernel's socket buffers hold

    def answer(_: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(chunk) * chunks))
        for _ in range(chunks):
            transport.write(chunk)

    async with scripted(answer) as (url, _, transports):
        client = upstream(url)
        response = await client.send("POST", "/v1/x", [], b"{}")
        await asyncio.sleep(0.3)  # read nothing: the connection stops reading, the server backs up
        assert transports[0].get_write_buffer_size() > 32 << 20
        received = 0
        while data := await response.readany():
            assert len(data) <= HIGH_WATER + (1 << 20)  # never more than one read past the mark
            received += len(data)
        assert received == len(chunk) * chunks
        response.release()
        await client.aclose()


async def test_an_answer_cut_short_a_garbled_one_and_silence_are_upstream_errors() -> None:
    def answer(request: bytes, transport: asyncio.Transport) -> None:
        if b"/cut" in request:
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            transport.close()
        elif b"/garbled" in request:
            transport.write(b"SMTP ready\r\n\r\n")
        # "/silent": nothing at all

    async with scripted(answer) as (url, _, _transports):
        client = upstream(url, upstream_timeout=0.2)
        response = await client.send("POST", "/cut", [], b"{}")
        assert await response.readany() == b"only part"
        with pytest.raises(UpstreamError, match="before the answer was complete"):
            await response.readany()
        response.release()
        with pytest.raises(UpstreamError, match="not valid HTTP"):
            await client.send("POST", "/garbled", [], b"{}")
        with pytest.raises(TimeoutError):
            await client.send("POST", "/silent", [], b"{}")
        await client.aclose()
    assert issubclass(UpstreamError, UPSTREAM_ERRORS)


async def test_a_cancelled_request_closes_its_connection() -> None:
    async with scripted(lambda _, __: None) as (url, _, transports):
        client = upstream(url)
        sending = asyncio.ensure_future(client.send("POST", "/v1/x", [], b"{}"))
        await asyncio.sleep(0.1)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await asyncio.sleep(0.1)
        assert not client.idle and not client.connections  # closed, not kept for the next request
        assert transports[0].is_closing() or transports[0].get_extra_info("socket") is None
        await client.aclose()


async def test_tls_is_verified_unless_insecure() -> None:
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    async with scripted(lambda _, t: t.write(ok(b"secret")), tls=server_tls) as (url, _, _transports):
        strict = upstream(url)
        with pytest.raises(ssl.SSLCertVerificationError):
            await strict.send("POST", "/v1/x", [], b"{}")
        await strict.aclose()
        insecure = upstream(url, insecure=True)
        assert await read_all(insecure) == b"secret"
        await insecure.aclose()


async def test_a_turns_writes_leave_in_one_send_and_close_flushes_them_first() -> None:
    class Recording:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    inner = Recording()
    corked = CorkedTransport(inner)  # type: ignore[arg-type]
    corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
    corked.write(b"body")
    assert inner.sent == []
    await asyncio.sleep(0)
    assert inner.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    corked.write(b"next turn")
    corked.close()
    assert inner.sent[-1] == b"next turn" and inner.closed
    assert corked.is_closing()  # everything else is the wrapped transport's
