"""The mock LLM provider, as the real openai and anthropic SDKs and raw HTTP clients see it."""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import anthropic
import anyio
import anyio.lowlevel
import httpx
import httpx2
import openai
import pytest
from test_cli import stigmergy_command

from stigmergy.cli import main
from stigmergy.clock import ManualClock
from stigmergy.errors import ConfigurationError
from stigmergy.mock_api import (
    MockConfig,
    MockConnectionReset,
    MockLLMAPI,
    api_key_id,
    count_input_tokens,
    go_duration,
    serve_mock,
)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROMPT = [{"role": "user", "content": "x" * 40}]  # 40 characters: 10 input tokens
WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z
UNREPORTED = (10, 16)  # served to the stream without include_usage, whose SDK reports no usage


@pytest.fixture
def anyio_backend() -> str:
    """The SDKs and uvicorn run on asyncio; the bare app is also tried on trio below."""
    return "asyncio"


def openai_sdk(app: MockLLMAPI) -> openai.AsyncOpenAI:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    return openai.AsyncOpenAI(base_url="http://mock/v1", api_key="test", max_retries=0, http_client=client)


def anthropic_sdk(app: MockLLMAPI) -> anthropic.AsyncAnthropic:
    # anthropic 2.x accepts only httpx2 clients; httpx2 has the same ASGITransport
    client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app))
    return anthropic.AsyncAnthropic(base_url="http://mock", api_key="test", max_retries=0, http_client=client)


def raw_client(app: MockLLMAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://mock")


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-mock", "messages": PROMPT, **extra}


def message(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-mock", "max_tokens": 100, "messages": PROMPT, **extra}


async def run_sdk_calls(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> tuple[int, int]:
    """Every SDK call shape, streamed and not; returns the (input, output) tokens the SDKs reported."""
    used = [0, 0]

    def add(input_tokens: int, output_tokens: int) -> None:
        used[0] += input_tokens
        used[1] += output_tokens

    completion = await oai.chat.completions.create(**chat(max_tokens=5))
    assert completion.usage is not None and completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "the field paces every call"
    add(completion.usage.prompt_tokens, completion.usage.completion_tokens)

    stream = await oai.chat.completions.create(**chat(stream=True, stream_options={"include_usage": True}))
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).count(" ") == 15
    add(chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)

    bare = await oai.chat.completions.create(**chat(stream=True))  # no usage chunk unless asked
    assert all(chunk.choices and chunk.usage is None for chunk in [c async for c in bare])

    reply = await ant.messages.create(**message(system="be brief"))  # system: 8 characters, 2 tokens
    assert reply.usage.input_tokens == 12 and reply.usage.cache_read_input_tokens == 0
    assert reply.stop_reason == "end_turn"
    add(reply.usage.input_tokens, reply.usage.output_tokens)

    events = [event async for event in await ant.messages.create(**message(max_tokens=3, stream=True))]
    assert [e.type for e in events[:3]] == ["message_start", "content_block_start", "content_block_delta"]
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.usage.cache_creation_input_tokens == 0 and delta.delta.stop_reason == "max_tokens"
    add(start.message.usage.input_tokens, delta.usage.output_tokens)

    async with ant.messages.stream(**message()) as helper:
        final = await helper.get_final_message()
    assert final.content[0].type == "text" and len(final.content[0].text.split()) == 16
    add(final.usage.input_tokens, final.usage.output_tokens)
    return used[0], used[1]


def assert_stats_match(stats: dict[str, Any], used: tuple[int, int]) -> None:
    served = (used[0] + UNREPORTED[0], used[1] + UNREPORTED[1])
    assert stats["completed"] == 6 and stats["by_status"] == {"200": 6}
    assert (stats["input_tokens"], stats["output_tokens"]) == served
    assert stats["by_key"] == {
        api_key_id("test"): {"requests": 6, "input_tokens": served[0], "output_tokens": served[1]}
    }
    assert stats["by_model"]["claude-mock"] == {"requests": 3, "input_tokens": 32, "output_tokens": 35}
    assert stats["in_flight"] == 0 and stats["cancelled"] == 0


@pytest.mark.anyio
async def test_the_real_sdks_in_process_and_usage_matches_stats() -> None:
    app = MockLLMAPI(MockConfig(rpm=100, tpm=100_000, itpm=10_000, otpm=10_000))
    async with openai_sdk(app) as oai, anthropic_sdk(app) as ant:
        used = await run_sdk_calls(oai, ant)
    assert_stats_match(app.stats.as_json(), used)


@pytest.mark.anyio
async def test_the_real_sdks_over_tcp_and_stats_endpoint() -> None:
    async with serve_mock(MockConfig(rpm=100)) as url:
        async with (
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0) as oai,
            anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0) as ant,
        ):
            used = await run_sdk_calls(oai, ant)
        async with httpx.AsyncClient(base_url=url) as client:
            assert_stats_match((await client.get("/_stats")).json(), used)
            assert (await client.post("/_reset")).status_code == 200
            assert (await client.get("/_stats")).json()["completed"] == 0


def parse_go_duration(text: str) -> float:
    assert re.fullmatch(r"(\d+(\.\d+)?(h|ms|m|s))+", text), text
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.0004, "1ms"),
        (1, "1s"),
        (7.66, "7.66s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_go_durations_as_openai_sends_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(seconds, abs=0.001)


@pytest.mark.anyio
async def test_rpm_bucket_429_headers_and_refill_on_an_injected_clock() -> None:
    clock = ManualClock(100.0)
    app = MockLLMAPI(MockConfig(rpm=60), clock=clock, wall_clock=lambda: WALL)
    assert app.used() == 0.0
    async with raw_client(app) as client:
        for _ in range(60):
            assert (await client.post(CHAT, json=chat())).status_code == 200
        assert app.used() == 1.0  # what the demo shows as the API's pressure
        refused = await client.post(CHAT, json=chat())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "1000"
        assert refused.headers["x-ratelimit-limit-requests"] == "60"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert parse_go_duration(refused.headers["x-ratelimit-reset-requests"]) == 60.0  # "1m0s"
        assert refused.headers["x-request-id"].startswith("req_")
        assert refused.json()["error"]["type"] == "requests"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"

        anthropic_refused = await client.post(MESSAGES, json=message())
        assert anthropic_refused.status_code == 429
        assert anthropic_refused.json() == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": anthropic_refused.json()["error"]["message"]},
        }
        reset = anthropic_refused.headers["anthropic-ratelimit-requests-reset"]
        assert datetime.fromisoformat(reset) == datetime.fromtimestamp(WALL + 60, UTC)
        assert anthropic_refused.headers["request-id"].startswith("req_")

        clock.advance(1.0)  # one request's worth refills
        assert (await client.post(CHAT, json=chat())).status_code == 200
        assert (await client.post(CHAT, json=chat())).status_code == 429
    assert app.stats.rate_limited == 3 and app.stats.completed == 61
    clock.advance(15.0)
    assert abs(app.used() - 0.75) < 1e-9


@pytest.mark.anyio
async def test_token_buckets_charge_max_tokens_and_refund_the_unused_output() -> None:
    clock = ManualClock()
    app = MockLLMAPI(MockConfig(tpm=100, itpm=50, otpm=90), clock=clock, wall_clock=lambda: WALL)
    async with raw_client(app) as client:
        first = await client.post(CHAT, json=chat(max_tokens=50))  # charged 10 + 50 of TPM
        assert first.headers["x-ratelimit-remaining-tokens"] == "40"
        second = await client.post(MESSAGES, json=message(max_tokens=50))  # 34 unused came back
        assert second.headers["anthropic-ratelimit-input-tokens-remaining"] == "30"
        assert second.headers["anthropic-ratelimit-output-tokens-remaining"] == "24"  # 90 - 50 + 34 - 50
        assert second.headers["anthropic-ratelimit-tokens-remaining"] == "14"  # the tightest: TPM
        assert datetime.fromisoformat(
            second.headers["anthropic-ratelimit-tokens-reset"]
        ) == datetime.fromtimestamp(
            WALL + 52,
            UTC,  # 86 tokens short of full at 100/60 per second = 51.6 s, rounded up
        )
        too_large = await client.post(CHAT, json=chat(max_tokens=95))  # 105 > TPM: never fits
        assert too_large.status_code == 429 and too_large.headers["x-should-retry"] == "false"
        assert "retry-after" not in too_large.headers and too_large.json()["error"]["type"] == "tokens"
    async with openai_sdk(app) as oai:
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(**chat(max_tokens=60))


def test_input_tokens_are_characters_over_four() -> None:
    payload = {
        "system": [{"type": "text", "text": "abcd"}],
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image"}]},
        ],
    }
    assert count_input_tokens(payload) == 3  # ceil(12 / 4)


async def statuses(app: MockLLMAPI, calls: int) -> list[int | str]:
    seen: list[int | str] = []
    async with raw_client(app) as client:
        for i in range(calls):
            try:
                response = await client.post(CHAT if i % 2 else MESSAGES, json=message())
            except httpx.TransportError:
                seen.append("reset")
            else:
                seen.append(response.status_code)
    return seen


@pytest.mark.anyio
async def test_seeded_faults_are_reproducible() -> None:
    config = MockConfig(p502=0.2, p529=0.2, p_reset=0.1, seed=7)
    first = await statuses(MockLLMAPI(config), 60)
    assert first == await statuses(MockLLMAPI(config), 60)
    assert first != await statuses(MockLLMAPI(MockConfig(p502=0.2, p529=0.2, p_reset=0.1, seed=8)), 60)
    assert {502, 503, 529, "reset", 200} == set(first)
    assert all(s != 503 for s in first[::2]) and all(s != 529 for s in first[1::2])  # by dialect


@pytest.mark.anyio
async def test_fault_bodies_in_each_providers_shape() -> None:
    app = MockLLMAPI(MockConfig(p529=1.0))
    async with raw_client(app) as client:
        overloaded = await client.post(MESSAGES, json=message())
        assert overloaded.status_code == 529
        assert overloaded.json()["error"]["type"] == "overloaded_error"
        assert (
            await client.post(CHAT, json=chat(), headers={"x-stainless-retry-count": "1"})
        ).status_code == 503
    assert (app.stats.overloaded, app.stats.retried, app.stats.by_status) == (2, 1, {529: 1, 503: 1})
    async with raw_client(MockLLMAPI(MockConfig(p502=1.0))) as client:
        bad_gateway = await client.post(CHAT, json=chat())
        assert bad_gateway.status_code == 502 and bad_gateway.text == "502 Bad Gateway"


@pytest.mark.anyio
async def test_latency_draws_are_seeded_and_use_the_injected_sleep() -> None:
    async def sleeps(seed: int) -> list[float]:
        slept: list[float] = []

        async def record(seconds: float) -> None:
            slept.append(seconds)

        config = MockConfig(
            ttft=0.5, ttft_sigma=0.5, token_delay=0.01, p_spike=0.5, output_tokens=3, seed=seed
        )
        app = MockLLMAPI(config, sleep=record)
        async with raw_client(app) as client:
            for _ in range(5):
                await client.post(CHAT, json=chat(stream=True))
        return slept

    first = await sleeps(1)
    assert first == await sleeps(1) and first != await sleeps(2)
    per_token = [first[i + 1] for i in range(0, len(first), 4)]
    assert len(first) == 20 and set(per_token) <= {0.01, 0.1}  # each call: ttft, then 3 tokens
    assert set(per_token) == {0.01, 0.1}  # spikes multiply a call's latency by 10


@pytest.mark.anyio
async def test_a_reset_in_process_is_a_transport_error() -> None:
    async with raw_client(MockLLMAPI(MockConfig(p_reset=1.0))) as client:
        with pytest.raises(MockConnectionReset) as caught:
            await client.post(CHAT, json=chat())
    assert isinstance(caught.value, httpx.ReadError)


@pytest.mark.anyio
async def test_a_reset_over_tcp_is_a_real_connection_reset() -> None:
    app = MockLLMAPI(MockConfig(p_reset=1.0))
    async with serve_mock(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for stream in (False, True):
                # an RST reads as ECONNRESET: httpx raises ReadError, with no status at all
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    await client.post(CHAT, json=chat(stream=stream))
        async with anthropic.AsyncAnthropic(base_url=url, api_key="test", max_retries=0) as ant:
            with pytest.raises(anthropic.APIConnectionError):
                await ant.messages.create(**message())
    assert app.stats.resets == 3 and app.stats.by_status == {} and app.stats.in_flight == 0


def stream_scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": [], "client": ("127.0.0.1", 1)}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_client_disconnect_mid_stream_cancels_the_reply(anyio_backend: str) -> None:
    app = MockLLMAPI(MockConfig(output_tokens=1000))
    body = json.dumps(message(max_tokens=1000, stream=True)).encode()
    frames: list[bytes] = []
    gone = anyio.Event()
    requests = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        if (request := next(requests, None)) is not None:
            return request
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(event: Any) -> None:
        if event["type"] == "http.response.body":
            frames.append(event["body"])
            if len(frames) == 5:
                gone.set()

    await app(stream_scope(MESSAGES), receive, send)
    assert 5 <= len(frames) < 10  # it stopped within a token or two of the disconnect
    stats = app.stats
    assert (stats.cancelled, stats.completed, stats.in_flight, stats.output_tokens) == (1, 0, 0, 0)


@pytest.mark.anyio
async def test_a_client_disconnect_over_tcp_cancels_the_upstream_call() -> None:
    app = MockLLMAPI(MockConfig(output_tokens=2000, token_delay=0.005))
    async with serve_mock(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", CHAT, json=chat(stream=True)) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
        with anyio.fail_after(5):  # a guard against hanging, not a timing assertion
            while not app.stats.cancelled:  # noqa: ASYNC110 - the app exposes a counter, not an event
                await anyio.sleep(0.01)
    assert (app.stats.completed, app.stats.in_flight, app.stats.by_status) == (0, 0, {200: 1})


@pytest.mark.anyio
async def test_calls_over_max_concurrency_are_answered_overloaded() -> None:
    release = anyio.Event()

    async def held(_: float) -> None:
        await release.wait()

    app = MockLLMAPI(MockConfig(max_concurrency=1), sleep=held)
    async with raw_client(app) as client, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(client.post, CHAT, json=chat()))
        while not app.stats.in_flight:
            await anyio.lowlevel.checkpoint()
        assert (await client.post(CHAT, json=chat())).status_code == 503
        assert (await client.post(MESSAGES, json=message())).status_code == 529
        release.set()
    stats = app.stats
    assert (stats.over_concurrency, stats.overloaded, stats.max_in_flight, stats.completed) == (2, 2, 1, 1)


@pytest.mark.anyio
async def test_bad_requests_get_clear_errors_in_the_providers_shape() -> None:
    app = MockLLMAPI(MockConfig(max_body_bytes=1000))
    async with raw_client(app) as client:
        not_json = await client.post(CHAT, content=b"{")
        assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
        no_cap = await client.post(MESSAGES, json=message(max_tokens=None))
        assert no_cap.status_code == 400 and "max_tokens" in no_cap.json()["error"]["message"]
        assert (await client.post(CHAT, json=chat(messages=[]))).status_code == 400
        assert (await client.post(CHAT, content=b" " * 1001)).status_code == 413
        assert (await client.get(CHAT)).status_code == 404
    assert app.stats.attempts == 4 and app.stats.by_status == {400: 3, 413: 1}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"rpm": -1}, "rpm"),
        ({"tpm": 0}, "tpm"),
        ({"otpm": 1.5}, "otpm"),
        ({"p502": 1.5}, "p502"),
        ({"p529": -0.1}, "p529"),
        ({"p502": 0.6, "p_reset": 0.6}, "p_reset"),
        ({"ttft": float("nan")}, "ttft"),
        ({"token_delay": -1.0}, "token_delay"),
        ({"spike_multiplier": 0.5}, "spike_multiplier"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"output_tokens": 0}, "output_tokens"),
    ],
)
def test_config_rejects_what_cannot_work(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        MockConfig(**settings)


def test_cli_rejects_bad_values_and_a_missing_uvicorn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["mock-api", "--rpm", "-1"]) == 2
    assert "rpm must be a positive integer" in capsys.readouterr().err
    assert main(["mock-api", "--port", "70000"]) == 2
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    assert main(["mock-api", "--port", "0"]) == 2
    assert "pip install 'stigmergy-field[proxy]'" in capsys.readouterr().err


def test_cli_serves_until_ctrl_c() -> None:
    command = [*stigmergy_command(), "mock-api", "--port", "0", "--rpm", "5"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = [process.stdout.readline() for _ in range(3)]
            url = banner[0].split()[-1]
            assert f'base_url="{url}/v1"' in banner[1] and f'base_url="{url}"' in banner[2]
            # Right after the banner, before the server is up: the socket already listens.
            reply = httpx.post(f"{url}{MESSAGES}", json=message(), headers={"x-api-key": "k"})
            assert reply.status_code == 200
            assert reply.headers["anthropic-ratelimit-requests-remaining"] == "4"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0, process.stderr.read() if process.stderr else ""
        finally:
            process.kill()  # a no-op once it has exited; else the with block would wait forever
