"""StigmergyTransport: the real openai and anthropic SDKs, paced in-process against the mock provider."""

from __future__ import annotations

import random

import anyio
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from sdk_clients import anthropic_client, asgi, openai_client

from stigmergy.budgets import GLOBAL, TokenBudgets
from stigmergy.clock import AcceleratedClock
from stigmergy.gate import Gate
from stigmergy.integrations.httpx_transport import StigmergyTransport
from stigmergy.mock_api import MockConfig, MockLLMAPI, serve_mock

pytestmark = pytest.mark.anyio

MODEL = "mock-model"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # serve_mock runs uvicorn, which needs asyncio


def clients(transport: StigmergyTransport, base_url: str) -> tuple[AsyncOpenAI, AsyncAnthropic]:
    return openai_client(base_url, transport), anthropic_client(base_url, transport)


async def call(openai: AsyncOpenAI, anthropic: AsyncAnthropic, kind: int) -> int:
    """One call of four kinds (SDK x streaming); returns the tokens the SDK reports."""
    messages = [{"role": "user", "content": f"question {kind} " * 10}]
    if kind == 0:
        reply = await openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)  # type: ignore[arg-type]
        assert reply.usage is not None
        return reply.usage.prompt_tokens + reply.usage.completion_tokens
    if kind == 1:
        stream = await openai.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
        return usage[-1].prompt_tokens + usage[-1].completion_tokens
    if kind == 2:
        message = await anthropic.messages.create(model=MODEL, messages=messages, max_tokens=20)  # type: ignore[arg-type]
        return message.usage.input_tokens + message.usage.output_tokens
    async with anthropic.messages.stream(model=MODEL, messages=messages, max_tokens=20) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_message()
    return final.usage.input_tokens + final.usage.output_tokens


async def test_both_sdks_streaming_and_not_are_paced_and_metered_in_process() -> None:
    mock = MockLLMAPI(MockConfig(output_tokens=8))
    budgets = TokenBudgets(total=1e9)
    gate = Gate(budgets=budgets)
    # one transport per SDK: each sends through its own HTTP library
    openai = openai_client("http://mock", StigmergyTransport(asgi(AsyncOpenAI, mock), gate=gate))
    anthropic = anthropic_client("http://mock", StigmergyTransport(asgi(AsyncAnthropic, mock), gate=gate))
    reported = [await call(openai, anthropic, kind) for kind in range(4)]
    stats = mock.stats
    assert stats.completed == 4 and sum(reported) == stats.input_tokens + stats.output_tokens
    assert budgets.snapshot()[GLOBAL]["spent"] == sum(reported)
    assert budgets.snapshot()[GLOBAL]["reserved"] == 0


async def test_twenty_agents_share_a_60_rpm_key_with_faults_and_none_of_them_fails() -> None:
    """20 agents x 10 calls on a 60 RPM key, 10% of attempts failing (502, 529/503, TCP resets).

    Time runs 20 times faster for the mock and the gate alike (one AcceleratedClock), so
    the 200 calls at 60 per minute take about 7 s instead of 140 s.
    """
    clock = AcceleratedClock(20.0)
    config = MockConfig(rpm=60, output_tokens=8, p502=0.04, p529=0.03, p_reset=0.03, seed=11)
    mock = MockLLMAPI(config, clock=clock, wall_clock=clock.wall, sleep=clock.sleep)
    budgets = TokenBudgets(total=1e9)
    gate = Gate(clock=clock, budgets=budgets)
    reported: list[int] = []
    transports: list[StigmergyTransport] = []
    async with serve_mock(mock) as base_url:

        async def agent(n: int) -> None:
            transport = StigmergyTransport(gate=gate, agent_id=f"agent-{n}")
            transports.append(transport)
            openai, anthropic = clients(transport, base_url)
            kinds = random.Random(n).choices(range(4), k=10)
            for kind in kinds:
                reported.append(await call(openai, anthropic, kind))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(agent, n)
    stats = mock.stats
    assert len(reported) == 200 and stats.completed == 200  # not one call failed
    assert stats.bad_gateway + stats.overloaded + stats.resets > 0  # faults did happen, and were retried
    assert stats.rate_limited <= 0.02 * stats.attempts
    # every attempt the mock saw was sent by a transport (one may die before the mock counts it)
    assert sum(t.attempts for t in transports) >= stats.attempts
    assert sum(reported) == stats.input_tokens + stats.output_tokens == budgets.snapshot()[GLOBAL]["spent"]
