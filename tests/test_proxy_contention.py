"""Many agents, one key, one proxy: the real SDKs never see the upstream's limit or its faults.

The mock provider and the proxy's gate share one AcceleratedClock, so their minute-long
rate-limit windows pass in seconds; the clients' timeouts are scaled by the same factor.
"""

from __future__ import annotations

import random

import anyio
import httpx2
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from test_transport import call

from stigmergy.clock import AcceleratedClock
from stigmergy.integrations.proxy_config import ProxyConfig
from stigmergy.integrations.proxy_server import serve_proxy
from stigmergy.mock_api import MockConfig, MockLLMAPI, serve_mock

pytestmark = pytest.mark.anyio

SPEED = 25.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp need asyncio


def accelerated_mock(config: MockConfig) -> tuple[MockLLMAPI, AcceleratedClock]:
    clock = AcceleratedClock(SPEED)
    return MockLLMAPI(config, clock=clock, wall_clock=clock.wall, sleep=clock.sleep), clock


def sdk_clients(url: str, agent: str, timeout: float) -> tuple[AsyncOpenAI, AsyncAnthropic]:
    """Both SDKs for one agent, retries off: any failure the proxy lets through reaches the test."""
    http = httpx2.AsyncClient(timeout=timeout)
    headers = {"x-stigmergy-agent": agent}
    openai = AsyncOpenAI(
        base_url=f"{url}/v1", api_key="sk-shared", max_retries=0, timeout=timeout, http_client=http
    )
    anthropic = AsyncAnthropic(
        base_url=url, api_key="sk-shared", max_retries=0, timeout=timeout, http_client=http
    )
    return openai.with_options(default_headers=headers), anthropic.with_options(default_headers=headers)


async def run_agents(url: str, agents: int, calls: int, client_timeout: float) -> list[int]:
    """``agents`` concurrent agents of ``calls`` calls each (a seeded mix of SDK x streaming)."""
    reported: list[int] = []

    async def agent(n: int) -> None:
        openai, anthropic = sdk_clients(url, f"agent-{n}", client_timeout)
        for kind in random.Random(n).choices(range(4), k=calls):
            reported.append(await call(openai, anthropic, kind))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for n in range(agents):
                tg.start_soon(agent, n)
    return reported


async def test_twenty_agents_that_never_retry_see_no_failure_from_a_faulty_50_rpm_key() -> None:
    """20 agents x 8 calls with ``max_retries=0``, on a 50 RPM key where 8% of attempts get a 502
    and 5% a connection reset: the proxy paces them under the limit and retries every fault
    before its first byte, so not one call fails. At 25x, the ~3 minutes of traffic take ~8 s."""
    mock, clock = accelerated_mock(MockConfig(rpm=50, output_tokens=8, p502=0.08, p_reset=0.05, seed=5))
    async with serve_mock(mock) as upstream, serve_proxy(ProxyConfig(upstream), clock=clock) as (url, app):
        reported = await run_agents(url, agents=20, calls=8, client_timeout=600.0)
    stats = mock.stats
    assert len(reported) == 160 and stats.completed == 160  # not one client-visible failure
    assert stats.bad_gateway > 0 and stats.resets > 0  # the faults happened, and were retried
    assert stats.rate_limited <= 0.02 * stats.attempts  # paced under the limit, not bounced off it
    assert app.metrics.retries == stats.attempts - 160
    assert sum(reported) == stats.input_tokens + stats.output_tokens


async def test_fifty_agents_with_a_120_s_timeout_never_time_out_at_50_rpm() -> None:
    """50 agents x 3 calls at 50 RPM, each SDK with a 120 s timeout and no retries: the gate orders
    them so each waits about agents / rate = 1 minute for its next call, never the 2 minutes that
    would time it out. 120 s of the shared clock is 120 / 25 = 4.8 s of real time for the SDKs."""
    mock, clock = accelerated_mock(MockConfig(rpm=50, output_tokens=8, seed=6))
    async with serve_mock(mock) as upstream, serve_proxy(ProxyConfig(upstream), clock=clock) as (url, app):
        reported = await run_agents(url, agents=50, calls=3, client_timeout=120.0 / SPEED)
    assert len(reported) == 150 and mock.stats.completed == 150  # no timeout, no refusal
    assert app.metrics.by_outcome == {"ok": 150}
    assert mock.stats.rate_limited <= 3
