"""StigmergyRouter on real LangGraph: concurrency, dependency order, sync and async nodes, merging, retry."""

from __future__ import annotations

import asyncio
import importlib
import operator
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage, AnyMessage
from langgraph.graph.message import add_messages

from stigmergy import Gate, StigmergyScheduler, UnknownDependencyError
from stigmergy.integrations.langgraph import FieldRuntime, PressureState, StigmergyRouter

pytestmark = pytest.mark.anyio

NAP = 0.5  # seconds each recorded node takes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangGraph runs on asyncio


class State(PressureState, total=False):
    log: Annotated[list[str], operator.add]  # a reducer: every task's entry is kept
    messages: Annotated[list[AnyMessage], add_messages]  # type: ignore[misc]
    last: str  # no reducer: the last completed task's value stands
    seen: dict[str, list[str]]


class Spans:
    """(start, end) of each task's run, on the monotonic clock, and the log each one saw."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}
        self.seen: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _done(self, state: dict[str, Any], start: float) -> dict[str, Any]:
        task = state["_current_task"]
        with self._lock:
            self.spans[task] = (start, time.monotonic())
            self.seen[task] = list(state.get("log", []))
        return {"log": [task], "last": task, "messages": [AIMessage(f"{task} done", id=task)]}

    def sync_node(self, nap: float = NAP) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def node(state: dict[str, Any]) -> dict[str, Any]:
            start = time.monotonic()
            time.sleep(nap)
            return self._done(state, start)

        return node

    def async_node(self, nap: float = NAP) -> Callable[[dict[str, Any]], Any]:
        async def node(state: dict[str, Any]) -> dict[str, Any]:
            start = time.monotonic()
            await asyncio.sleep(nap)
            return self._done(state, start)

        return node

    def overlap(self, *tasks: str) -> bool:
        """True when the tasks were all running at one instant."""
        return max(self.spans[t][0] for t in tasks) < min(self.spans[t][1] for t in tasks)

    def after(self, task: str, *before: str) -> bool:
        return all(self.spans[task][0] >= self.spans[b][1] for b in before)


@pytest.fixture
def quick_retries() -> Iterator[FieldRuntime]:
    """A runtime of its own whose back-off after a failed attempt lasts milliseconds."""
    gate = Gate()
    runtime = FieldRuntime(gate=gate, scheduler=StigmergyScheduler(field=gate.field, retry_half_life=0.02))
    yield runtime
    runtime.close()


def four_independent(spans: Spans, node: Callable[[float], Any]) -> StigmergyRouter:
    router = StigmergyRouter()
    for n in range(4):
        router.register_agent(f"agent-{n}", node(NAP))
        router.add_task(f"t{n}", f"agent-{n}")
    return router


def test_four_independent_sync_nodes_run_at_once_under_invoke() -> None:
    spans = Spans()
    state = four_independent(spans, spans.sync_node).build_graph(State).invoke({"log": []})
    assert spans.overlap("t0", "t1", "t2", "t3")  # 4 x 0.5 s in about 0.5 s, not 2 s
    assert sorted(state["log"]) == ["t0", "t1", "t2", "t3"] and state["pending_tasks"] == []


async def test_async_nodes_are_awaited_and_run_with_sync_nodes_under_ainvoke() -> None:
    spans = Spans()
    router = StigmergyRouter()
    for n in range(4):
        node = spans.async_node() if n % 2 else spans.sync_node()
        router.register_agent(f"agent-{n}", node)
        router.add_task(f"t{n}", f"agent-{n}")
    state = await router.build_graph(State).ainvoke({"log": []})
    assert spans.overlap("t0", "t1", "t2", "t3")
    assert sorted(state["completed_tasks"]) == ["t0", "t1", "t2", "t3"]
    assert sorted(state["log"]) == ["t0", "t1", "t2", "t3"]  # the async nodes' updates too: awaited


async def test_dependents_start_as_dependencies_end_and_see_their_merged_updates() -> None:
    spans = Spans()
    router = StigmergyRouter()
    router.register_agent("planner", spans.async_node(0.1))
    router.register_agent("left", spans.sync_node(0.5))
    router.register_agent("right", spans.async_node(0.1))
    router.register_agent("joiner", spans.sync_node(0.1))
    router.add_task("plan", "planner", priority=0.9)
    router.add_task("slow", "left", deps=["plan"])
    router.add_task("fast", "right", deps=["plan"])
    router.add_task("fast2", "right", deps=["fast"])  # need not wait for the slow branch
    router.add_task("join", "joiner", deps=["slow", "fast2"])
    state = await router.build_graph(State).ainvoke({"log": ["start"], "messages": []})

    assert spans.after("slow", "plan") and spans.after("fast", "plan") and spans.after("fast2", "fast")
    assert spans.after("join", "slow", "fast2")
    assert spans.spans["fast2"][0] < spans.spans["slow"][1]  # no superstep barrier
    assert spans.seen["slow"] == ["start", "plan"]  # the state with its dependency's update merged
    assert set(spans.seen["join"]) == {"start", "plan", "slow", "fast", "fast2"}
    assert state["log"][0] == "start" and sorted(state["log"][1:]) == [
        "fast",
        "fast2",
        "join",
        "plan",
        "slow",
    ]
    assert [m.id for m in state["messages"]][-1] == "join" and len(state["messages"]) == 5  # add_messages
    assert state["last"] == "join"  # a plain key: the last completed write, no InvalidUpdateError
    assert state["outputs"]["join"]["last"] == "join"


def test_failures_are_retried_and_a_failed_task_cancels_only_its_dependents(
    quick_retries: FieldRuntime,
) -> None:
    attempts: dict[str, int] = {}

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        task = state["_current_task"]
        attempts[task] = attempts.get(task, 0) + 1
        if task == "broken" or (task == "flaky" and attempts[task] == 1):
            raise RuntimeError(f"{task} fell over")
        return {"log": [task]}

    router = StigmergyRouter(runtime=quick_retries, max_attempts=3)
    router.register_agent("worker", flaky, concurrency=4)
    router.add_task("flaky", "worker")
    router.add_task("broken", "worker", max_attempts=2)
    router.add_task("after-broken", "worker", deps=["broken"])
    router.add_task("fine", "worker")
    state = router.build_graph(State).invoke({"log": []})

    assert attempts == {"flaky": 2, "broken": 2, "fine": 1}  # after-broken never ran
    assert sorted(state["completed_tasks"]) == ["fine", "flaky"] and sorted(state["log"]) == ["fine", "flaky"]
    assert sorted(state["pending_tasks"]) == ["after-broken", "broken"]
    assert state["errors"]["broken"] == "RuntimeError: broken fell over"
    assert "broken" in state["errors"]["after-broken"]  # cancelled: its dependency failed


async def test_one_scheduler_for_every_invocation_holds_agent_concurrency_across_graphs() -> None:
    spans: list[tuple[float, float]] = []

    async def solo(state: dict[str, Any]) -> dict[str, Any]:
        start = time.monotonic()
        await asyncio.sleep(0.2)
        spans.append((start, time.monotonic()))
        return {"log": ["job"]}

    router = StigmergyRouter()
    router.register_agent("solo", solo)  # one task at a time, in the whole process
    router.add_task("job", "solo")
    graph = router.build_graph(State)
    first, second = await asyncio.gather(graph.ainvoke({"log": []}), graph.ainvoke({"log": []}))
    assert first["log"] == second["log"] == ["job"]
    earlier, later = sorted(spans)
    assert later[0] >= earlier[1]  # the second invocation's task waited: both went through one scheduler


def test_the_stigmergy_langgraph_api_runs_and_skips_completed_tasks() -> None:
    ran: list[str] = []

    def writer(state: dict[str, Any]) -> dict[str, Any]:
        ran.append(state["_current_task"])
        return {"output": f"wrote {state['_task_description']}"}

    router = StigmergyRouter(wake_threshold=0.4, decay_half_life=300)
    router.register_agent("writer", writer)
    router.register_agent("reviewer", lambda state: {"output": "Review complete"})
    with pytest.raises(ValueError, match="not registered"):
        router.add_task("x", agent="nobody")
    router.add_task("draft", agent="writer", priority=0.8, description="the draft")
    router.add_task("review", agent="reviewer", priority=0.6, deps=["draft"])
    graph = router.build_graph(PressureState)
    initial = {"messages": [], "completed_tasks": [], "pending_tasks": ["draft", "review"], "outputs": {}}
    result = graph.invoke(initial)  # type: ignore[arg-type]
    assert result["outputs"] == {"draft": "wrote the draft", "review": "Review complete"}
    assert sorted(result["completed_tasks"]) == ["draft", "review"] and result["pending_tasks"] == []

    again = graph.invoke({**initial, "completed_tasks": ["draft"], "outputs": {"draft": "old"}})  # type: ignore[arg-type]
    assert ran == ["draft"]  # draft was already done: only review ran
    assert again["outputs"] == {"draft": "old", "review": "Review complete"}


def test_bad_plans_and_async_nodes_under_invoke_are_refused() -> None:
    router = StigmergyRouter()
    router.register_agent("a", lambda state: {})
    router.add_task("t", "a", deps=["missing"])
    with pytest.raises(UnknownDependencyError, match="missing"):
        router.build_graph(State).invoke({})

    async def node(state: dict[str, Any]) -> dict[str, Any]:
        return {}

    router = StigmergyRouter()
    router.register_agent("a", node)
    router.add_task("t", "a")
    with pytest.raises(TypeError, match="ainvoke"):
        router.build_graph(State).invoke({})


def test_a_missing_langgraph_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langgraph.graph", None)  # as if langgraph were not installed
    monkeypatch.delitem(sys.modules, "stigmergy.integrations.langgraph")
    with pytest.raises(ImportError, match=r"pip install 'stigmergy-field\[langgraph\]'"):
        importlib.import_module("stigmergy.integrations.langgraph")
