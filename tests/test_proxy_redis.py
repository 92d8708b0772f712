"""Several proxies, one field: two ``stigmergy proxy`` processes on one Redis share the upstream's limit."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter

import anyio
import httpx
import pytest
from test_cli import stigmergy_command

from stigmergy.mock_api import MockConfig, MockLLMAPI, serve_mock

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RPM = 60


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # serve_mock runs uvicorn, which needs asyncio


def start_proxy(upstream: str, redis: str) -> subprocess.Popen[str]:
    command = [*stigmergy_command(), "proxy", "--upstream", upstream, "--port", "0", "--redis", redis]
    command += ["--rpm", str(RPM), "--log-level", "warning"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def proxy_url(process: subprocess.Popen[str]) -> str:
    """The address from the banner: ``stigmergy proxy: http://127.0.0.1:PORT -> upstream (provider)``."""
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert banner.startswith("stigmergy proxy: http://"), f"no banner: {banner!r}"
    return banner.split()[2]


async def test_two_proxy_processes_on_one_redis_field_keep_the_upstream_under_its_limit(
    redis_url: str,
) -> None:
    """Each proxy alone would admit a full window (60 requests at once) and the pair twice that;
    sharing the field's spends through Redis, together they send what one 60 RPM bucket allows:
    its 60 requests, then one a second. Admission reads the field, then spends in it with floors
    that Redis checks in the same step, so at the window's edge two processes can't both take
    the last room: no 429 at all, and no client sees a failure."""
    mock = MockLLMAPI(MockConfig(rpm=RPM, output_tokens=4))
    field = f"{redis_url}?key_prefix=proxy-{uuid.uuid4().hex[:8]}"
    served: Counter[str] = Counter()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with serve_mock(mock) as upstream:
        processes = [start_proxy(upstream, field) for _ in range(2)]
        try:
            urls = [await anyio.to_thread.run_sync(proxy_url, p) for p in processes]

            async def agent(url: str, client: httpx.AsyncClient) -> None:
                while True:
                    response = await client.post(f"{url}/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                    served[url] += 1
                    if sum(served.values()) >= RPM + 3:  # the window's burst, then some paced
                        enough.set()

            enough = anyio.Event()
            started = time.monotonic()
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as client:
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for n in range(30):
                            tg.start_soon(agent, urls[n % 2], client)
                        await enough.wait()
                        tg.cancel_scope.cancel()
            elapsed = time.monotonic() - started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)
    assert mock.stats.rate_limited == 0  # the spends are guarded in Redis: no window overshoots
    assert mock.stats.attempts <= RPM + elapsed * RPM / 60 + 2  # one bucket's worth, not two
    assert min(served.values()) > 0 and sum(served.values()) <= mock.stats.completed  # some cut short
