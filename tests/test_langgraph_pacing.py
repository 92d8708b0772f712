"""StigmergyRateLimiter and its callback: LangChain chat models in a LangGraph app, paced by the field."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from stigmergy import AcceleratedClock, Gate, Route, TokenBudgets
from stigmergy.budgets import GLOBAL
from stigmergy.integrations.langgraph import (
    FieldRuntime,
    PressureState,
    StigmergyRateLimiter,
    StigmergyRouter,
)
from stigmergy.integrations.langgraph_pacing import ModelCall
from stigmergy.mock_api import MockConfig, MockLLMAPI

pytestmark = pytest.mark.anyio

ROUTE = Route("http://mock", model="mock-model")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangChain's async callbacks run on asyncio


class MockChat(BaseChatModel):
    """A chat model that calls the mock provider (OpenAI dialect); an error status raises."""

    client: httpx.AsyncClient

    @property
    def _llm_type(self) -> str:
        return "mock-chat"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("async only")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        payload = {
            "model": ROUTE.model,
            "messages": [{"role": "user", "content": str(m.content)} for m in messages],
            "max_tokens": 8,
        }
        response = await self.client.post("/v1/chat/completions", json=payload)
        response.raise_for_status()
        body = response.json()
        usage = body["usage"]
        message = AIMessage(
            body["choices"][0]["message"]["content"],
            usage_metadata={
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            },
            response_metadata={"headers": dict(response.headers)},  # as include_response_headers=True
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


@pytest.fixture
def clock() -> AcceleratedClock:
    return AcceleratedClock(20.0)  # a minute's window passes in 3 s


@pytest.fixture
def runtime(clock: AcceleratedClock) -> Iterator[FieldRuntime]:
    runtime = FieldRuntime(gate=Gate(clock=clock, budgets=TokenBudgets(total=1e9)))
    yield runtime
    runtime.close()


def team_graph(models: list[MockChat], calls: int, rejected: list[int], runtime: FieldRuntime) -> Any:
    """One agent per model, each making ``calls`` model calls; 429s that reach a node are counted."""
    router = StigmergyRouter(runtime=runtime)
    for n, model in enumerate(models):

        async def node(state: dict[str, Any], model: MockChat = model) -> dict[str, Any]:
            for _ in range(calls):
                try:
                    await model.ainvoke(f"{state['_current_task']}: what next?")
                except httpx.HTTPStatusError as exc:
                    rejected.append(exc.response.status_code)
            return {}

        router.register_agent(f"agent-{n}", node)
        router.add_task(f"work-{n}", f"agent-{n}")
    return router.build_graph(PressureState)


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "unpaced"])
async def test_at_a_low_rpm_no_429_reaches_the_graph_when_paced(
    paced: bool, clock: AcceleratedClock, runtime: FieldRuntime
) -> None:
    """8 agents x 10 calls on a 60 RPM key: paced, no 429 at all; unpaced, the graph's nodes get them."""
    mock = MockLLMAPI(
        MockConfig(rpm=60, output_tokens=8), clock=clock, wall_clock=clock.wall, sleep=clock.sleep
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=mock), base_url="http://mock")
    models = []
    for n in range(8):
        limiter = StigmergyRateLimiter(f"agent-{n}", ROUTE, runtime=runtime)
        pacing: dict[str, Any] = {"rate_limiter": limiter, "callbacks": [limiter.callback]} if paced else {}
        models.append(MockChat(client=client, **pacing))
    rejected: list[int] = []
    state = await asyncio.wait_for(team_graph(models, 10, rejected, runtime).ainvoke({}), 60)
    assert len(state["completed_tasks"]) == 8
    stats = mock.stats
    if not paced:
        assert rejected and set(rejected) == {429} and stats.rate_limited == len(rejected)
        return
    assert rejected == [] and stats.rate_limited == 0 and stats.completed == 80
    budgets = runtime.gate.budgets
    assert budgets is not None
    await asyncio.sleep(0.1)  # the last settlements travel to the runtime's loop
    books = budgets.snapshot()[GLOBAL]
    assert books["reserved"] == 0  # every admitted call was settled by the callback...
    assert books["spent"] == stats.input_tokens + stats.output_tokens  # ...with the usage it reported


class Refusing(BaseChatModel):
    """Fails every call the way an SDK does: with the HTTP answer attached."""

    error: Exception

    @property
    def _llm_type(self) -> str:
        return "refusing"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        raise self.error


def http_error(status: int, headers: dict[str, str]) -> httpx.HTTPStatusError:
    """An SDK-style error: the HTTP answer attached (the CrewAI tests use it too)."""
    request = httpx.Request("POST", "http://mock/v1/chat/completions")
    response = httpx.Response(
        status, headers=headers, json={"error": {"message": "slow down"}}, request=request
    )
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


async def test_a_429_and_a_reset_connection_are_deposited_as_holds(runtime: FieldRuntime) -> None:
    gate = runtime.gate
    limiter = StigmergyRateLimiter("agent", ROUTE, runtime=runtime, provider="openai")
    model = Refusing(
        error=http_error(429, {"retry-after": "30"}), rate_limiter=limiter, callbacks=[limiter.callback]
    )
    with pytest.raises(httpx.HTTPStatusError):
        await model.ainvoke("hi")
    await asyncio.sleep(0.05)
    reading = await runtime.acall(gate.read, ROUTE)
    assert 20 < reading.hold <= 30  # held until the retry-after (accelerated clock: a little has passed)
    assert gate.channels()[ROUTE]["in_flight"] == 0  # the failed call's ticket was released

    other = Route("http://other", model="m")
    limiter = StigmergyRateLimiter("agent", other, runtime=runtime)
    model = Refusing(error=httpx.ConnectError("reset"), rate_limiter=limiter, callbacks=[limiter.callback])
    with pytest.raises(httpx.ConnectError):
        await model.ainvoke("hi")
    await asyncio.sleep(0.05)
    reading = await runtime.acall(gate.read, other)
    assert reading.soft < 0  # soft error pressure (its short pause passed: the clock runs 20x)


def test_sync_nodes_wait_in_worker_threads_and_settle_each_call(runtime: FieldRuntime) -> None:
    limiter = StigmergyRateLimiter("writer", ROUTE, runtime=runtime)
    model = FakeListChatModel(responses=["ok"] * 6, rate_limiter=limiter, callbacks=[limiter.callback])

    def writer(state: dict[str, Any]) -> dict[str, Any]:
        return {"output": [model.invoke("write").content for _ in range(3)]}

    router = StigmergyRouter(runtime=runtime)
    router.register_agent("writer", writer, concurrency=2)
    router.add_task("a", "writer")
    router.add_task("b", "writer")
    state = router.build_graph(PressureState).invoke({})
    assert state["outputs"] == {"a": ["ok"] * 3, "b": ["ok"] * 3}
    budgets = runtime.gate.budgets
    assert budgets is not None
    assert runtime.call(asyncio.sleep, 0.05) is None  # let the settlements land
    assert budgets.snapshot()[GLOBAL]["reserved"] == 0 and runtime.gate.channels()[ROUTE]["in_flight"] == 0


async def test_sync_acquire_refuses_to_block_an_event_loop(runtime: FieldRuntime) -> None:
    limiter = StigmergyRateLimiter("writer", ROUTE, runtime=runtime)
    with pytest.raises(RuntimeError, match="freeze that loop"):
        limiter.acquire()
    assert await limiter.aacquire()  # the async path is fine


async def test_a_streamed_call_reports_its_first_token(runtime: FieldRuntime) -> None:
    limiter = StigmergyRateLimiter("writer", ROUTE, runtime=runtime)
    settled: list[ModelCall] = []
    succeeded = limiter.pacer.succeeded

    def capture(call: ModelCall, **kwargs: Any) -> Any:
        settled.append(call)
        return succeeded(call, **kwargs)

    limiter.pacer.succeeded = capture  # type: ignore[method-assign]
    model = GenericFakeChatModel(
        messages=iter([AIMessage("one two three")]), rate_limiter=limiter, callbacks=[limiter.callback]
    )
    chunks = [chunk.content async for chunk in model.astream("count")]
    assert len(chunks) > 1 and len(settled) == 1
    call = settled[0]
    assert call.first_token is not None and call.first_token >= call.admitted  # time to first token
