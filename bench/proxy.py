"""Benchmark ``stigmergy proxy``: latency it adds, requests/s, and memory with 1,000 open streams.

    python bench/proxy.py [--seconds 3] [--streams 1000] [--skip-clients]

Everything runs on this machine, each server in its own process: the mock provider
(``MockLLMAPI``, limits off, on uvicorn with httptools and uvloop, as the proxy runs), the
proxy (``stigmergy proxy``, defaults) in front of it, and the load generator here: one
keep-alive connection per concurrent client, each a bare asyncio protocol with httptools'
parser on uvloop, sending its next request as soon as the previous answer is complete.
Its ceiling is the "direct to a canned upstream" row: over 10,000 requests/s at 64
connections here, where aiohttp's client (the load generator before) topped out near 1,650,
less than the proxy needs to show 3,000.

1. Latency and throughput: for 1 and 64 concurrent connections, non-streamed and
   streamed (SSE) chat completions, each for ``--seconds``: p50/p99 latency of a
   whole request (to the last byte) and requests/s, direct to the mock and through the
   proxy; "added" is the difference. The mock itself is Python, and the proxy shares the
   two cores with it, so a last row runs the proxy in front of a canned-response upstream
   (a bare asyncio server) to show what the proxy alone sustains; the row before it, the
   load generator straight to that upstream, is the load generator's ceiling.
2. Memory: ``--streams`` SSE streams held open through a fresh proxy (to a mock that
   sends a token a second); the proxy's peak RSS (VmHWM) once every stream has its
   first bytes.
3. The upstream client (``--skip-clients`` skips it): a minimal uvicorn pass-through
   forwarding with httpx, with aiohttp, and with the proxy's own connections
   (``stigmergy.integrations.proxy_upstream``), at 1 and 64 connections to the canned
   upstream, with the pass-through's CPU time per request. The proxy uses its own
   connections because of this comparison.

Targets, printed with PASS/MISS: p50 added <= 0.5 ms at 1 connection (non-stream);
>= 3,000 requests/s through the proxy at 64 connections (non-stream, against the mock);
1,000 open streams in <= 200 MB RSS. Each phase is bounded by ``--seconds`` or a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httptools

from stigmergy.asgi import read_body

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the proxy extra where it installs
    uvloop = None

T = TypeVar("T")

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
CANNED = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 16},
    }
).encode()


def stigmergy() -> list[str]:
    script = shutil.which("stigmergy", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "stigmergy.cli"]


@contextlib.contextmanager
def server(command: list[str], marker: str) -> Iterator[tuple[str, int]]:
    """Start a server process, read its URL from the first stdout line containing ``http://``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if marker in line and "http://" in line:
                url = next(word for word in line.split() if word.startswith("http://"))
                yield url.rstrip("/,"), process.pid
                return
            if not line and process.poll() is not None:
                break
        raise RuntimeError(f"{command[:3]} did not start")
    finally:
        process.terminate()
        process.wait(10)


def mock(output_tokens: int, token_delay: float = 0.0) -> contextlib.AbstractContextManager[tuple[str, int]]:
    return server(this_script("--serve-mock", str(output_tokens), str(token_delay)), "mock")


def proxy(upstream: str) -> contextlib.AbstractContextManager[tuple[str, int]]:
    return server(
        [*stigmergy(), "proxy", "--upstream", upstream, "--port", "0", "--log-level", "warning"], "proxy"
    )


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid`` in MB, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    connections: int
    stream: bool
    latencies: list[float]
    seconds: float
    warm_up: int = 0  # requests before the measured ones (CPU counters see them too)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


class _Client(asyncio.Protocol):
    """One keep-alive connection: sends the request again as soon as the previous answer is complete.

    A raw asyncio protocol with httptools' C parser, driven from its callbacks: per request
    it costs a fraction of what aiohttp's client does, so on these 2 shared cores the load
    generator is not what limits the proxy (its ceiling is printed against a canned upstream).
    """

    def __init__(self, request: bytes, until: float, latencies: list[float], done: asyncio.Future[None]):
        self.request, self.until, self.latencies, self.done = request, until, latencies, done
        self.parser = httptools.HttpResponseParser(self)
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.send()

    def send(self) -> None:
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        status = self.parser.get_status_code()
        if status != 200:
            self.finish(RuntimeError(f"HTTP {status}"))
        elif now >= self.until:
            self.latencies.append(now - self.started)
            self.finish(None)
        else:
            self.latencies.append(now - self.started)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(exc or ConnectionError("the server closed the connection"))

    def finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)
        self.transport.close()


async def load(base: str, connections: int, stream: bool, seconds: float, label: str) -> Run:
    """``connections`` clients, each sending one request after another for ``seconds``."""
    payload = json.dumps(BODY | {"stream": stream}).encode()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
        "content-type: application/json\r\nauthorization: Bearer sk-bench\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    loop = asyncio.get_running_loop()

    async def clients(count: int, until: float, latencies: list[float]) -> None:
        done = [loop.create_future() for _ in range(count)]
        for future in done:
            await loop.create_connection(
                lambda f=future: _Client(request, until, latencies, f), host, int(port)
            )
        try:
            await asyncio.gather(*done)
        except Exception as exc:
            raise RuntimeError(f"{label}: {exc}") from exc

    warm_up: list[float] = []
    await clients(connections, time.perf_counter() + 0.3, warm_up)  # the proxy's upstream connections
    latencies: list[float] = []
    started = time.perf_counter()
    await clients(connections, started + seconds, latencies)
    return Run(label, connections, stream, latencies, time.perf_counter() - started, len(warm_up))


# -- servers for the comparisons --------------------------------------------------------------------


class Canned(asyncio.Protocol):
    """A bare HTTP/1.1 upstream answering every request with one small JSON body: a fast stand-in."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(CANNED)).encode()
                + b"\r\n\r\n"
                + CANNED
            )


async def serve_canned() -> None:
    server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", 0)
    print(f"canned upstream on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def serve_passthrough(client: str, upstream: str) -> None:
    """A minimal uvicorn pass-through (no gate, no metering) forwarding with ``client``."""
    import httpx

    from stigmergy.integrations.proxy_config import ProxyConfig
    from stigmergy.integrations.proxy_upstream import Upstream, read_error_body

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, 100_000_000)
        url = upstream + scope["path"]
        if client == "httpx":
            http = state.setdefault("http", httpx.AsyncClient(limits=httpx.Limits(max_connections=None)))
            response = await http.post(url, content=body)
            status, content = response.status_code, response.content
        elif client == "stigmergy":
            ours = state.get("ours") or state.setdefault("ours", Upstream(ProxyConfig(upstream=upstream)))
            answer = await ours.send("POST", scope["path"], [("content-type", "application/json")], body)
            status, (content, _) = answer.status, await read_error_body(answer)
            answer.release()
        else:
            http = state.setdefault("http", aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
            async with http.post(url, data=body) as upstream_response:
                status, content = upstream_response.status, await upstream_response.read()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    run_uvicorn(app, f"pass-through ({client})")


def run_uvicorn(app: Any, label: str) -> None:
    """Serve ``app`` on a free port (uvicorn makes the socket, so TCP_NODELAY is on); print its URL."""
    import uvicorn

    config = uvicorn.Config(
        app,
        port=0,
        log_level="warning",
        access_log=False,
        http="httptools",
        lifespan="off",
        proxy_headers=False,  # as the proxy: no forwarded-headers middleware in the way
    )
    uvicorn_server = uvicorn.Server(config)

    async def main() -> None:
        serving = asyncio.ensure_future(uvicorn_server.serve())
        for _ in range(1000):
            if uvicorn_server.started:
                break
            await asyncio.sleep(0.01)
        port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
        print(f"{label} on http://127.0.0.1:{port}", flush=True)
        await serving

    run(main())


def serve_mock(output_tokens: str, token_delay: str) -> None:
    """The mock provider, limits off. Not ``stigmergy mock-api``: its listening socket is made with
    protocol 0, so asyncio leaves Nagle on and every response stalls ~40 ms on a delayed ACK."""
    from stigmergy.mock_api import MockConfig, MockLLMAPI

    config = MockConfig(output_tokens=int(output_tokens), token_delay=float(token_delay))
    run_uvicorn(MockLLMAPI(config), "mock")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (the load generator's cost halves, or better)."""
    if uvloop is None:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def this_script(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


# -- phases -------------------------------------------------------------------------------------


def print_runs(runs: list[Run]) -> None:
    print(f"{'target':<34} {'conns':>5} {'stream':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'n':>7}")
    for run in runs:
        print(
            f"{run.label:<34} {run.connections:>5} {'yes' if run.stream else 'no':>6} "
            f"{run.quantile(0.5):>8.2f} {run.quantile(0.99):>8.2f} {run.rate:>8.0f} {len(run.latencies):>7}"
        )


def latency_and_throughput(seconds: float) -> dict[str, float]:
    runs: list[Run] = []
    added: dict[tuple[int, bool], tuple[float, float]] = {}
    cpu: dict[str, float] = {}
    with mock(16) as (upstream, mock_pid), proxy(upstream) as (through, proxy_pid):
        for connections in (1, 64):
            for stream in (False, True):
                direct = run(load(upstream, connections, stream, seconds, "direct to the mock"))
                before = {pid: cpu_seconds(pid) for pid in (mock_pid, proxy_pid)}
                proxied = run(load(through, connections, stream, seconds, "through the proxy"))
                if connections == 64 and not stream:
                    requests = len(proxied.latencies) + proxied.warm_up
                    for name, pid in (("mock", mock_pid), ("proxy", proxy_pid)):
                        cpu[name] = (cpu_seconds(pid) - before[pid]) / requests * 1e6
                runs += [direct, proxied]
                added[connections, stream] = (
                    proxied.quantile(0.5) - direct.quantile(0.5),
                    proxied.quantile(0.99) - direct.quantile(0.99),
                )
    with server(this_script("--serve-canned"), "canned") as (canned, _), proxy(canned) as (through, _):
        runs.append(run(load(canned, 64, False, seconds, "direct to a canned upstream")))
        runs.append(run(load(through, 64, False, seconds, "proxy to a canned upstream")))
    print_runs(runs)
    print("\nadded by the proxy (p50 / p99, ms):")
    for (connections, stream), (p50, p99) in added.items():
        kind = "stream" if stream else "non-stream"
        print(f"  {connections:>2} connection(s), {kind:<10}: {p50:+.2f} / {p99:+.2f}")
    print(
        f"\nCPU per request through the proxy, 64 connections, non-stream: proxy {cpu['proxy']:.0f} µs, "
        f"mock {cpu['mock']:.0f} µs (the load generator's share comes on top, on the same 2 cores)"
    )
    proxied_64 = next(
        r for r in runs if r.label == "through the proxy" and r.connections == 64 and not r.stream
    )
    return {"added_p50_ms": added[1, False][0], "rps_64": proxied_64.rate, "canned_rps_64": runs[-1].rate}


async def hold_streams(base: str, count: int) -> int:
    """Open ``count`` streams, wait for each one's first bytes; returns how many got them."""
    payload = json.dumps(BODY | {"stream": True, "max_tokens": 60}).encode()
    opened = 0
    all_open = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def stream() -> None:
            nonlocal opened
            async with session.post(f"{base}/v1/chat/completions", data=payload) as response:
                await response.content.readany()
                opened += 1
                if opened == count:
                    all_open.set()
                await asyncio.sleep(3600)  # hold it open until cancelled

        tasks = [asyncio.ensure_future(stream()) for _ in range(count)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), 60)
        got = opened
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


def open_streams(count: int) -> float:
    with (
        mock(60, 1.0) as (upstream, _),
        proxy(upstream) as (through, pid),
    ):
        run(load(through, 1, False, 0.2, "warm-up"))
        idle, _ = peak_rss_mb(pid)
        got = run(hold_streams(through, count))
        _, peak = peak_rss_mb(pid)
    print(
        f"\n{got} of {count} SSE streams open through one proxy: RSS {idle:.0f} MB idle, peak {peak:.0f} MB"
    )
    return peak if got == count else float("inf")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upstream_clients(seconds: float) -> None:
    print("\nminimal pass-through to the canned upstream, by upstream client:")
    with server(this_script("--serve-canned"), "canned") as (canned, _):
        for client in ("httpx", "aiohttp", "stigmergy"):
            with server(this_script("--serve-passthrough", client, canned), "pass-through") as (url, pid):
                for connections in (1, 64):
                    before = cpu_seconds(pid)
                    measured = run(load(url, connections, False, seconds, f"pass-through, {client}"))
                    requests = len(measured.latencies) + measured.warm_up
                    cpu = (cpu_seconds(pid) - before) / requests * 1e6
                    print(
                        f"  {client:<9} {connections:>2} conns: {measured.rate:>6.0f} req/s, "
                        f"p50 {measured.quantile(0.5):.2f} ms, {cpu:.0f} µs CPU/request"
                    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    parser.add_argument("--streams", type=int, default=1000, help="SSE streams held open (default 1000)")
    parser.add_argument("--skip-clients", action="store_true", help="skip the upstream clients' comparison")
    parser.add_argument("--serve-canned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-mock", nargs=2, metavar=("TOKENS", "DELAY"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-passthrough", nargs=2, metavar=("CLIENT", "UPSTREAM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_canned:
        run(serve_canned())
        return 0
    if args.serve_mock:
        serve_mock(*args.serve_mock)
        return 0
    if args.serve_passthrough:
        serve_passthrough(*args.serve_passthrough)
        return 0
    figures = latency_and_throughput(args.seconds)
    peak = open_streams(args.streams)
    if not args.skip_clients:
        upstream_clients(args.seconds)
    added, rps = figures["added_p50_ms"], figures["rps_64"]
    print("\ntargets:")
    print(f"  p50 added at 1 connection <= 0.5 ms:     {added:+.2f} ms  {verdict(added <= 0.5)}")
    print(f"  >= 3,000 req/s at 64 connections (mock): {rps:.0f}  {verdict(rps >= 3000)}")
    print(f"  {args.streams} open streams <= 200 MB RSS:    {peak:.0f} MB  {verdict(peak <= 200)}")
    print(f"  (proxy alone, canned upstream, 64 connections: {figures['canned_rps_64']:.0f} req/s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
