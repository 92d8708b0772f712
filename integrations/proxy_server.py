"""Serving the proxy on uvicorn: in a running loop for tests (:func:`serve_proxy`), or as the CLI.

uvicorn's access log is off (it would print query strings, where Gemini keys
travel): the proxy logs one redacted line per request itself. Its ``server`` and
``date`` headers are off too, so the upstream's reach the client unchanged.

Requests are parsed by httptools (C), not h11 (pure Python), which cost more per
request than the rest of uvicorn's work for it. httptools would turn an absolute-form target
(``GET http://elsewhere/ HTTP/1.1``) into its bare path, hiding that the client asked
for another host; :class:`ProxyProtocol` hands the app the target as sent,
so the proxy refuses it as it refuses CONNECT. A response's head and body, written by
uvicorn one after the other, leave in one send (:class:`CorkedTransport`): on loopback a
send costs more than the rest of uvicorn's work for a response. The CLI runs on uvloop
when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from stigmergy.clock import Clock
from stigmergy.integrations.proxy import DISCONNECT_EXTENSION, ProxyApp, create_proxy_app
from stigmergy.integrations.proxy_config import ProxyConfig

ASGIApp = Callable[..., Awaitable[None]]


class CorkedTransport:
    """A transport whose writes in one turn of the event loop leave together, at the end of the turn.

    uvicorn writes a response's status line and headers, then each body message, as
    separate sends; the proxy sends a whole small answer (or a stream's first chunk) in
    one turn, so it goes out in one send. A stream's later chunks arrive in later turns
    and are not held back: each turn's writes are flushed at its end (``call_soon``).
    Everything but writing and closing goes straight to the wrapped transport.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if data:
            if not self._pending:
                self._loop.call_soon(self._flush)
            self._pending.append(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ProxyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol: writes corked, disconnects announced, targets kept as sent.

    Writes go through a :class:`CorkedTransport`. A request's scope carries the
    :data:`~stigmergy.integrations.proxy.DISCONNECT_EXTENSION`, whose callbacks run
    when the client goes before its answer is complete. An absolute-form (``http://host/path``),
    authority-form (``host:443``, CONNECT) or asterisk-form (``*``) target becomes
    ``scope["path"]`` and ``scope["raw_path"]`` whole, as h11 gives it, instead of
    httptools' path without the host; the proxy refuses every target that does not
    start with ``/``.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CorkedTransport(transport))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_EXTENSION: {"callbacks": []}}

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # gone before its answer was complete
            hooks: dict[str, Any] = cycle.scope["extensions"][DISCONNECT_EXTENSION]  # type: ignore[assignment]
            for callback in hooks["callbacks"]:
                callback()

    def on_headers_complete(self) -> None:
        target = self.url
        if target.startswith(b"/"):
            super().on_headers_complete()
            return
        self.url = b"/"  # parses anywhere; the scope gets the real target below
        super().on_headers_complete()
        # The app's task is created above but runs only once this callback has returned.
        self.scope["path"] = target.decode("latin-1")
        self.scope["raw_path"] = target
        self.scope["query_string"] = b""


class _Server(uvicorn.Server):
    """A uvicorn server that leaves Ctrl-C to the program hosting it (tests, benchmarks)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: ASGIApp, host: str, port: int, *, embedded: bool) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="auto",
        http=ProxyProtocol,
        proxy_headers=False,
        ws="none",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        log_config=None if embedded else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=1 if embedded else 10,
    )
    return _Server(config) if embedded else uvicorn.Server(config)


def _url(server: uvicorn.Server) -> str:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _started(server: uvicorn.Server, serving: asyncio.Future[None]) -> str:
    while not server.started:
        if serving.done():
            serving.result()  # startup failed: raise why
            raise RuntimeError("the proxy stopped before it started")
        await asyncio.sleep(0.005)
    return _url(server)


@contextlib.asynccontextmanager
async def serve_asgi(app: ASGIApp, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve any ASGI app on a free port of ``host`` inside the running asyncio loop; yields its URL.

    The server runs as a plain asyncio task (uvicorn needs asyncio), so errors in the
    ``with`` body come out as themselves, not wrapped in an exception group.
    """
    server = _server(app, host, 0, embedded=True)
    serving = asyncio.ensure_future(server.serve())
    try:
        yield await _started(server, serving)
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def serve_proxy(
    config: ProxyConfig | ProxyApp, *, clock: Clock | None = None
) -> AsyncIterator[tuple[str, ProxyApp]]:
    """Serve the proxy in the running loop on a free port (``config.port`` is ignored); yields URL and app."""
    app = config if isinstance(config, ProxyApp) else create_proxy_app(config, clock=clock)
    async with serve_asgi(app, app.config.host) as url:
        yield url, app


def run_proxy(config: ProxyConfig) -> int:
    """``stigmergy proxy``: serve until Ctrl-C; returns the exit code."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stigmergy").setLevel(config.log_level.upper())
    app = create_proxy_app(config)
    server = _server(app, config.host, config.port, embedded=False)

    async def main() -> None:
        serving = asyncio.ensure_future(server.serve())
        url = await _started(server, serving)  # uvicorn logs why it cannot listen, and exits 1
        print(f"stigmergy proxy: {url} -> {config.upstream} ({config.provider_name})", flush=True)
        await serving

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (not on Windows): its I/O costs less per request than asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed with the proxy extra wherever it builds
        return None
    return uvloop.new_event_loop
