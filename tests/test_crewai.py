"""StigmergyCrew, StigmergyManager and StigmergyLLM on real CrewAI with fake LLMs: no network."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from crewai import Agent, Task
from crewai.llms.base_llm import BaseLLM
from pydantic import Field
from test_langgraph_pacing import http_error

from stigmergy import AcceleratedClock, Gate, Route, StigmergyScheduler, TaskError, TokenBudgets
from stigmergy.budgets import GLOBAL
from stigmergy.integrations.crewai import FieldRuntime, StigmergyCrew, StigmergyLLM, StigmergyManager
from stigmergy.mock_api import MockConfig, MockLLMAPI, serve_mock

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # CrewAI's own

NAP = 0.5
TOKENS = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # CrewAI runs on asyncio


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """CrewAI's telemetry and tracing would try the network (and stall without one)."""
    monkeypatch.setenv("CREWAI_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("CREWAI_TRACING_ENABLED", "false")


class Record:
    """(start, end) of each task's LLM call on the monotonic clock, and the prompt it got."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}
        self.prompts: dict[str, str] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def start(self, task: Any, messages: Any) -> tuple[str, float]:
        name = task.description
        with self.lock:
            self.prompts[name] = str(messages)
            self.calls[name] = self.calls.get(name, 0) + 1
        return name, time.monotonic()

    def end(self, name: str, start: float) -> str:
        with self.lock:
            self.spans[name] = (start, time.monotonic())
        return f"Final Answer: done {name}"

    def overlap(self, *tasks: str) -> bool:
        return max(self.spans[t][0] for t in tasks) < min(self.spans[t][1] for t in tasks)

    def after(self, task: str, *before: str) -> bool:
        return all(self.spans[task][0] >= self.spans[b][1] for b in before)


class FakeLLM(BaseLLM):
    """Sleeps like a model call; a task's first ``failures[task]`` calls raise ``errors[task]``."""

    record: Record
    nap: float = NAP
    failures: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, Exception] = Field(default_factory=dict)

    def _fail(self, name: str) -> None:
        if self.record.calls[name] <= self.failures.get(name, 0):
            raise self.errors.get(name) or RuntimeError(f"{name} fell over")
        self._track_token_usage_internal(dict(TOKENS))

    def call(self, messages: Any, from_task: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        name, start = self.record.start(from_task, messages)
        time.sleep(self.nap)
        self._fail(name)
        return self.record.end(name, start)

    async def acall(self, messages: Any, from_task: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        name, start = self.record.start(from_task, messages)
        await asyncio.sleep(self.nap)
        self._fail(name)
        return self.record.end(name, start)


def agent(llm: BaseLLM, role: str = "writer") -> Agent:
    return Agent(role=role, goal="write", backstory="a writer", llm=llm, max_retry_limit=0)


@pytest.fixture
def record() -> Record:
    return Record()


@pytest.fixture
def quick_retries() -> Iterator[FieldRuntime]:
    """A runtime of its own whose back-off after a failed attempt lasts milliseconds."""
    gate = Gate(budgets=TokenBudgets(total=1e9))
    runtime = FieldRuntime(gate=gate, scheduler=StigmergyScheduler(field=gate.field, retry_half_life=0.02))
    yield runtime
    runtime.close()


def four_and_a_summary(record: Record) -> StigmergyManager:
    """Four independent tasks on four agents that share one role, and a summary that needs all four."""
    agents = [agent(FakeLLM(model="fake", record=record)) for _ in range(4)]
    manager = StigmergyManager()
    for n, member in enumerate(agents):
        manager.add_task(f"t{n}", member, f"part {n}", priority=0.8)
    manager.add_task("summary", agents[0], "summary", deps=["t0", "t1", "t2", "t3"])
    return manager


def test_kickoff_runs_independent_tasks_at_once_and_the_dependent_after_them(record: Record) -> None:
    manager = four_and_a_summary(record)
    assert manager.task_order == ["t0", "t1", "t2", "t3", "summary"]
    crew = manager.build_crew()
    assert isinstance(crew, StigmergyCrew)
    output = crew.kickoff()
    parts = ["part 0", "part 1", "part 2", "part 3"]
    assert record.overlap(*parts)  # same role, four agents: 4 x 0.5 s in about 0.5 s, not 2 s
    assert record.after("summary", *parts)
    assert all(f"done {p}" in record.prompts["summary"] for p in parts)  # their outputs are its context
    assert output.raw == "done summary" and [t.raw for t in output.tasks_output][:2] == [
        "done part 0",
        "done part 1",
    ]


async def test_akickoff_runs_them_concurrently_without_blocking_the_loop(record: Record) -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    beating = asyncio.create_task(heartbeat())
    output = await four_and_a_summary(record).build_crew().akickoff()
    beating.cancel()
    assert record.overlap("part 0", "part 1", "part 2", "part 3") and record.after("summary", "part 3")
    assert output.raw == "done summary"
    assert ticks >= 10  # the loop kept running while the crew worked


def test_one_agent_runs_one_task_at_a_time_and_context_sets_dependencies(record: Record) -> None:
    busy = agent(FakeLLM(model="fake", record=record, nap=0.2))
    other = agent(FakeLLM(model="fake", record=record, nap=0.2))
    first = Task(description="first", expected_output="x", agent=busy)
    second = Task(description="second", expected_output="x", agent=busy)
    third = Task(description="third", expected_output="x", agent=other, context=[first])
    StigmergyCrew(agents=[busy, other], tasks=[first, second, third]).kickoff()
    one, two = sorted([record.spans["first"], record.spans["second"]])
    assert two[0] >= one[1]  # the same agent never runs two tasks at once (its executor is not reentrant)
    assert record.after("third", "first") and "done first" in record.prompts["third"]


def test_failed_attempts_are_retried_and_a_task_failing_for_good_raises_after_the_rest(
    record: Record, quick_retries: FieldRuntime
) -> None:
    llm = FakeLLM(model="fake", record=record, nap=0.01, failures={"flaky": 1, "broken": 99})
    members = [agent(llm) for _ in range(3)]
    manager = StigmergyManager(runtime=quick_retries, max_attempts=3)
    manager.add_task("flaky", members[0], "flaky")
    manager.add_task("broken", members[1], "broken", max_attempts=2)
    manager.add_task("after-broken", members[1], "after broken", deps=["broken"])
    manager.add_task("fine", members[2], "fine")
    with pytest.raises(TaskError) as raised:
        manager.build_crew().kickoff()
    assert record.calls == {"flaky": 2, "broken": 2, "fine": 1}  # after-broken never ran
    assert "broken: RuntimeError: broken fell over" in str(raised.value)
    assert "after-broken" in str(raised.value) and "flaky" not in str(raised.value)


def test_the_llm_wrapper_retries_a_429_once_the_gate_lets_it_and_deposits_usage(
    record: Record, quick_retries: FieldRuntime
) -> None:
    inner = FakeLLM(
        model="fake",
        record=record,
        nap=0.01,
        failures={"write": 1},
        errors={"write": http_error(429, {"retry-after-ms": "300"})},
    )
    route = Route("http://mock", model="fake")
    llm = StigmergyLLM(inner=inner, route=route, runtime=quick_retries)
    writer = agent(llm)
    StigmergyCrew(
        agents=[writer], tasks=[Task(description="write", expected_output="x", agent=writer)]
    ).kickoff()
    assert record.calls == {"write": 2}  # the 429, then the retry: ours, not CrewAI's
    gate = quick_retries.gate
    assert gate.budgets is not None
    quick_retries.call(asyncio.sleep, 0.05)  # let the settlement land
    books = gate.budgets.snapshot()[GLOBAL]
    assert books["reserved"] == 0 and books["spent"] == TOKENS["total_tokens"]
    assert llm.get_token_usage_summary().total_tokens == TOKENS["total_tokens"]


class MockProviderLLM(BaseLLM):
    """Calls the mock provider over HTTP (OpenAI dialect) from CrewAI's worker threads."""

    base: str

    def call(self, messages: Any, from_task: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": str(messages)}],
            "max_tokens": 8,
        }
        response = httpx.post(
            f"{self.base}/v1/chat/completions", json=payload, headers={"authorization": "Bearer k"}
        )
        response.raise_for_status()
        usage = response.json()["usage"]
        self._track_token_usage_internal(usage)
        return f"Final Answer: {response.json()['choices'][0]['message']['content']}"


@contextlib.contextmanager
def mock_in_a_thread(mock: MockLLMAPI) -> Iterator[str]:
    """Serve the mock from a loop of its own: CrewAI's async path keeps the caller's loop busy."""
    loop = asyncio.new_event_loop()
    base: concurrent.futures.Future[str] = concurrent.futures.Future()
    stop: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def serve() -> None:
        async with serve_mock(mock) as url:
            base.set_result(url)
            await asyncio.wrap_future(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        yield base.result(timeout=30)
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join()
        loop.close()


def test_crews_on_a_low_rpm_key_never_see_a_429() -> None:
    """10 tasks over 5 agents on a 6 RPM key (time runs 60 times faster for the mock and the gate)."""
    clock = AcceleratedClock(60.0)
    mock = MockLLMAPI(
        MockConfig(rpm=6, output_tokens=8), clock=clock, wall_clock=clock.wall, sleep=clock.sleep
    )
    runtime = FieldRuntime(gate=Gate(clock=clock, limits={"rpm": 6}))
    try:
        with mock_in_a_thread(mock) as base:
            llm = StigmergyLLM(inner=MockProviderLLM(model="mock-model", base=base), runtime=runtime)
            members = [agent(llm, role=f"member {n}") for n in range(5)]
            manager = StigmergyManager(runtime=runtime)
            for n in range(10):
                manager.add_task(f"t{n}", members[n % 5], f"task {n}")
            output = manager.build_crew().kickoff()
    finally:
        runtime.close()
    assert len(output.tasks_output) == 10
    assert mock.stats.rate_limited == 0 and mock.stats.completed == 10  # more calls than the window holds


def test_a_missing_crewai_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "crewai", None)  # as if crewai were not installed
    monkeypatch.delitem(sys.modules, "stigmergy.integrations.crewai")
    with pytest.raises(ImportError, match=r"pip install 'stigmergy-field\[crewai\]'"):
        importlib.import_module("stigmergy.integrations.crewai")
