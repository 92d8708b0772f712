"""The proxy end to end: real SDKs and raw HTTP through a real uvicorn server to real upstreams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import uvicorn
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from test_transport import call

from stigmergy.asgi import read_body
from stigmergy.integrations.proxy import ProxyApp
from stigmergy.integrations.proxy_config import ProxyConfig
from stigmergy.integrations.proxy_server import serve_asgi, serve_proxy
from stigmergy.mock_api import MockConfig, MockLLMAPI, serve_mock

pytestmark = pytest.mark.anyio

KEY = "sk-live-secret-key-0123456789"
TOKEN = "proxy-access-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp need asyncio


Scope = MutableMapping[str, Any]


class ScriptedUpstream:
    """An upstream that answers with the next step of its script, then echoes the request as JSON.

    A step is ``(status, headers, body)``, or ``"break"``: a 200 stream that stops after
    its first chunk without finishing (the connection is dropped).
    """

    def __init__(self, *script: tuple[int, list[tuple[str, str]], bytes] | str) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, 100_000_000)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        seen = {"method": scope["method"], "raw_path": scope["raw_path"].decode(), "headers": headers}
        self.requests.append(seen | {"query": scope["query_string"].decode(), "body": body.decode("latin-1")})
        step = self.script.pop(0) if self.script else None
        if step == "break":
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
            await send(start)
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            return  # unfinished: uvicorn drops the connection
        if isinstance(step, tuple):
            status, extra, payload = step
        else:
            status, payload = 201, json.dumps(self.requests[-1]).encode()
            extra = [("x-request-id", "req-42"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
        raw = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})


@asynccontextmanager
async def proxied(
    upstream: ScriptedUpstream | MockLLMAPI, *, plain_uvicorn: bool = False, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ProxyApp]]:
    """``upstream`` served, a proxy for it, and a client of the proxy.

    ``plain_uvicorn``: the proxy app on uvicorn's own httptools protocol instead of
    ``ProxyProtocol``, as any ASGI server would run it (no disconnect extension).
    """
    serving = serve_mock(upstream) if isinstance(upstream, MockLLMAPI) else serve_asgi(upstream)
    async with serving as base:
        proxy = (
            plain(ProxyApp(ProxyConfig(base, **settings)))
            if plain_uvicorn
            else serve_proxy(ProxyConfig(base, **settings))
        )
        async with proxy as (url, app), httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client, app


@asynccontextmanager
async def plain(app: ProxyApp) -> AsyncIterator[tuple[str, ProxyApp]]:
    config = uvicorn.Config(app, port=0, http="httptools", lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()  # it could not start: say why
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app
    finally:
        server.should_exit = True
        await serving


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait up to 2 s for ``condition`` to come true."""
    for _ in range(200):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError("the condition did not come true in time")


async def test_both_sdks_streaming_and_not_through_a_real_proxy() -> None:
    mock = MockLLMAPI(MockConfig(output_tokens=8))
    async with (
        serve_mock(mock) as upstream,
        serve_proxy(ProxyConfig(upstream, total_budget=1e9)) as (url, _),
    ):
        http = httpx2.AsyncClient()
        openai = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, http_client=http)
        anthropic = AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0, http_client=http)
        reported = [await call(openai, anthropic, kind) for kind in range(4)]
        metrics = (await http.get(f"{url}/_stigmergy/metrics")).json()
        await http.aclose()
    stats = mock.stats
    assert stats.completed == 4 and sum(reported) == stats.input_tokens + stats.output_tokens
    assert metrics["tokens"]["input"] + metrics["tokens"]["output"] == sum(reported)
    assert metrics["budgets"]["*"]["spent"] == sum(reported) and metrics["budgets"]["*"]["reserved"] == 0
    assert metrics["by_status"] == {"200": 4}
    assert {c["channel"].rsplit("|", 1)[1] for c in metrics["channels"]} == {"mock-model"}


async def test_requests_and_answers_pass_through_intact() -> None:
    upstream = ScriptedUpstream()
    async with proxied(upstream) as (client, app):
        response = await client.post(
            "/v1/some%2Fthing?a=1&b=%20x",
            content=b"\x00raw body\xff",
            headers=[
                ("x-custom", "1"),
                ("x-custom", "2"),
                ("authorization", f"Bearer {KEY}"),
                ("x-stigmergy-agent", "planner"),
                ("x-stigmergy-priority", "0.9"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic abc"),
                ("accept-encoding", "gzip"),
                ("host", "evil.example"),
            ],
        )
    assert response.status_code == 201
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    seen = response.json()
    assert seen == json.loads(json.dumps(upstream.requests[0]))
    assert (seen["method"], seen["raw_path"], seen["query"]) == ("POST", "/v1/some%2Fthing", "a=1&b=%20x")
    assert seen["body"].encode("latin-1") == b"\x00raw body\xff"
    headers = dict(seen["headers"])
    assert [v for k, v in seen["headers"] if k == "x-custom"] == ["1", "2"]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["accept-encoding"] == "identity"  # usage is read from the bytes as they pass
    assert headers["host"] == app.upstream.base.removeprefix("http://")  # never the client's host
    for dropped in ("x-stigmergy-agent", "x-stigmergy-priority", "x-hop", "te", "proxy-authorization"):
        assert dropped not in headers


async def test_errors_keep_their_status_body_and_headers() -> None:
    error = json.dumps({"error": {"message": "bad model", "type": "invalid_request_error"}}).encode()
    upstream = ScriptedUpstream(
        (400, [("x-request-id", "req-1")], error),
        (404, [], b"not here"),
        (503, [("x-request-id", "req-3")], b"{}"),  # retryable, but retries are off
    )
    async with proxied(upstream, max_retries=0) as (client, _):
        first = await client.post("/v1/chat/completions", json={"model": "m"})
        second = await client.get("/v1/models/nope")
        third = await client.post("/v1/chat/completions", json={"model": "m"})
    assert (first.status_code, first.content, first.headers["x-request-id"]) == (400, error, "req-1")
    assert (second.status_code, second.content) == (404, b"not here")
    assert (third.status_code, third.headers["x-request-id"]) == (503, "req-3")


async def test_retries_happen_before_the_first_byte_only_and_honour_the_deadline() -> None:
    overloaded = json.dumps({"type": "error", "error": {"type": "overloaded_error"}}).encode()
    upstream = ScriptedUpstream(
        (502, [], b"bad gateway"),
        (429, [("retry-after-ms", "300")], b"{}"),
        (529, [("retry-after-ms", "100")], overloaded),
    )
    urgent = {"x-api-key": KEY, "x-stigmergy-priority": "1"}  # no aging wait after the errors
    async with proxied(upstream) as (client, app):
        started = time.monotonic()
        answered = await client.post("/v1/messages", json={"model": "m"}, headers=urgent)
        assert answered.status_code == 201 and len(upstream.requests) == 4
        assert time.monotonic() - started >= 0.3  # the 429 asked for 300 ms: the gate held that long
        assert app.metrics.retries == 3
        upstream.script = ["break"]
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/messages", json={"model": "m"}, headers=urgent) as stream:
                await stream.aread()
        assert len(upstream.requests) == 5  # its first byte had reached the client: no retry
        assert app.metrics.by_outcome["broken_stream"] == 1
        upstream.script = [(429, [("retry-after", "3600")], b'{"error": {"message": "later"}}')]
        late = await client.post("/v1/chat/completions", json={"model": "m"})
        assert late.status_code == 429 and late.headers["retry-after"] == "3600"  # beyond max_backoff
        assert len(upstream.requests) == 6


@pytest.mark.parametrize("on_plain_uvicorn", [False, True], ids=["ProxyProtocol", "plain uvicorn"])
async def test_a_client_that_disconnects_cancels_its_upstream_request_and_its_wait(
    on_plain_uvicorn: bool,
) -> None:
    """On our server the protocol announces the disconnect; on any other a watcher task sees it."""
    mock = MockLLMAPI(MockConfig(output_tokens=200, token_delay=0.05))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    async with proxied(mock, plain_uvicorn=on_plain_uvicorn, max_in_flight=1) as (client, app):
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            async for _ in stream.aiter_bytes():
                break  # one chunk, then hang up mid-stream
        await eventually(lambda: mock.stats.cancelled == 1)
        assert mock.stats.in_flight == 0 and mock.stats.completed == 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as holder:
            chunks = holder.aiter_bytes()
            await chunks.__anext__()  # it now holds the only place in flight
            with anyio.move_on_after(0.3):
                await client.post("/v1/chat/completions", json=body)  # waits in the gate, then hangs up
            await eventually(lambda: app.metrics.by_outcome["disconnected"] == 2)
            (channel,) = app.gate.channels().values()
            assert channel["waiting"] == 0 and channel["in_flight"] == 1
    assert mock.stats.attempts == 2  # the request that waited never went upstream


def agent(name: str) -> dict[str, str]:
    return {"x-stigmergy-agent": name}


async def test_self_imposed_refusals_are_429s_in_the_providers_shape() -> None:
    mock = MockLLMAPI(MockConfig(output_tokens=200, token_delay=0.02))
    messages = [{"role": "user", "content": "hi"}]
    async with proxied(mock, agent_budget=150.0, max_in_flight=1, max_wait=0.2) as (client, _):
        over = await client.post(
            "/v1/messages",
            json={"model": "m", "messages": messages, "max_tokens": 1000},
            headers={"anthropic-version": "2023-06-01"} | agent("spender"),
        )
        assert over.status_code == 429 and over.headers["x-should-retry"] == "false"
        assert over.headers["x-stigmergy-error"] == "budget"
        assert over.json()["type"] == "error" and over.json()["error"]["type"] == "rate_limit_error"
        assert int(over.headers["retry-after-ms"]) > 0 and int(over.headers["retry-after"]) >= 1
        body = {"model": "m", "messages": messages, "max_tokens": 100, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=agent("a")) as holder:
            chunks = holder.aiter_bytes()
            await chunks.__anext__()  # it now holds the only place in flight
            waited = await client.post("/v1/chat/completions", json=body, headers=agent("b"))
    assert waited.status_code == 429 and waited.headers["x-stigmergy-error"] == "wait"
    assert waited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "x-should-retry" not in waited.headers and int(waited.headers["retry-after-ms"]) > 0


async def test_foreign_targets_are_refused_and_only_the_upstream_is_contacted() -> None:
    upstream = ScriptedUpstream()
    async with proxied(upstream) as (client, _):
        host, port = str(client.base_url).removeprefix("http://").rstrip("/").split(":")
        for line in (
            b"GET http://example.com/v1/models HTTP/1.1",  # httptools alone would hand over "/v1/models"
            b"POST http://example.com HTTP/1.1",
            b"CONNECT example.com:443 HTTP/1.1",
            b"OPTIONS * HTTP/1.1",
        ):
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(line + b"\r\nhost: example.com\r\nconnection: close\r\n\r\n")
                reply = b""
                with anyio.fail_after(5):
                    while b"\r\n\r\n" not in reply:
                        reply += await stream.receive()
            assert reply.startswith(b"HTTP/1.1 400"), reply
            assert b"x-stigmergy-error: foreign-target" in reply.lower()
    assert upstream.requests == []


async def test_an_access_token_guards_every_request_and_stays_here() -> None:
    upstream = ScriptedUpstream()
    async with proxied(upstream, access_token=TOKEN) as (client, _):
        missing = await client.post("/v1/messages", json={}, headers={"anthropic-version": "1"})
        wrong = await client.get("/_stigmergy/metrics", headers={"x-stigmergy-token": TOKEN + "x"})
        right = await client.post("/v1/chat/completions", json={}, headers={"x-stigmergy-token": TOKEN})
        health = await client.get("/_stigmergy/health", headers={"x-stigmergy-token": TOKEN})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert wrong.status_code == 401 and right.status_code == 201 and health.status_code == 200
    assert len(upstream.requests) == 1
    assert "x-stigmergy-token" not in dict(upstream.requests[0]["headers"])


async def test_a_body_over_the_limit_is_refused_before_it_goes_anywhere() -> None:
    upstream = ScriptedUpstream()
    async with proxied(upstream, max_body_bytes=1000) as (client, _):
        refused = await client.post("/v1/chat/completions", content=b"x" * 5000)
        accepted = await client.post("/v1/chat/completions", content=b"x" * 1000)
    assert refused.status_code == 413 and accepted.status_code == 201
    assert len(upstream.requests) == 1


async def test_keys_and_query_secrets_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (KEY, "gemini-secret-in-the-query", "ant-secret-key-xyz")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    openai_key = {"authorization": f"Bearer {KEY}", "x-stigmergy-priority": "1"}
    async with proxied(MockLLMAPI(MockConfig(output_tokens=4))) as (client, _):
        await client.post(f"/v1/chat/completions?key={secrets[1]}&alt=sse", json=body, headers=openai_key)
        await client.post(
            "/v1/messages", json=body, headers={"x-api-key": secrets[2], "anthropic-version": "1"}
        )
        shown = (await client.get("/_stigmergy/metrics")).text + (
            await client.get("/_stigmergy/prometheus")
        ).text
    nowhere = ProxyConfig("http://127.0.0.1:9", max_retries=1)  # nothing listens there
    async with serve_proxy(nowhere) as (url, _), httpx.AsyncClient(base_url=url) as client:
        down = await client.post(f"/v1/chat/completions?api_key={secrets[1]}", json=body, headers=openai_key)
    assert down.status_code == 502 and down.headers["x-stigmergy-error"] == "upstream-unreachable"
    ours = [r for r in caplog.records if r.name.startswith(("stigmergy", "uvicorn", "aiohttp"))]
    lines = [json.loads(r.getMessage()) for r in ours if r.getMessage().startswith('{"event":"request"')]
    assert len(lines) == 3
    assert {"agent", "channel", "wait_ms", "status", "input_tokens", "output_tokens"} <= lines[0].keys()
    assert lines[0]["path"] == "/v1/chat/completions?key=REDACTED&alt=sse" and lines[0]["output_tokens"] == 4
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in ours)
    for secret in secrets:
        assert secret not in logged and secret not in shown and secret not in down.text


async def test_health_metrics_and_prometheus() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with proxied(MockLLMAPI(MockConfig(rpm=600, output_tokens=4)), total_budget=10_000) as (
        client,
        app,
    ):
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        health = (await client.get("/_stigmergy/health")).json()
        metrics = (await client.get("/_stigmergy/metrics")).json()
        text = (await client.get("/_stigmergy/prometheus")).text
        missing = await client.get("/_stigmergy/nothing")
    assert health["status"] == "ok" and health["upstream"] == app.upstream.base
    (channel,) = metrics["channels"]
    assert channel["limits"]["rpm"] == 600 and 0 < channel["fill"]["rpm"] < 0.01
    assert metrics["requests"] == 3 and metrics["wait_seconds"]["samples"] == 3
    assert metrics["overhead_seconds"]["p50"] <= metrics["overhead_seconds"]["p99"] < 0.5
    assert metrics["budgets"]["*"]["limit"] == 10_000
    assert 'stigmergy_requests_total{status="200"} 3' in text
    assert 'dimension="rpm"' in text and 'stigmergy_budget_tokens{budget="*",kind="spent"}' in text
    assert missing.status_code == 404
