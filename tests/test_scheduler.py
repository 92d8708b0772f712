"""StigmergyScheduler: the stigmergy-scheduler API, pressure, retries, bad graphs, events, stop.

Time is a ManualClock wherever timing matters: a test moves it (or a dispatcher
does, to model work that takes time) and then waits until every task is blocked.
Nothing here sleeps for correctness.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from stigmergy import (
    ConfigurationError,
    DependencyCycleError,
    DispatchResult,
    DuplicateTaskError,
    InvalidTaskError,
    ManualClock,
    RunSummary,
    StigmergyScheduler,
    TaskEvent,
    TaskSpec,
    TaskStatus,
    UnknownDependencyError,
)
from stigmergy.graph import DEPENDENCY_PULL

pytestmark = pytest.mark.anyio

Dispatch = Callable[[str, TaskSpec], Awaitable[DispatchResult]]


class Recorder:
    """A dispatcher that logs what ran, in order, and succeeds unless told otherwise."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock
        self.started: list[str] = []
        self.finished: list[str] = []
        self.times: dict[str, float] = {}
        self.failures: dict[str, int] = {}  # task id -> attempts that fail before one succeeds
        self.duration = 0.0  # manual seconds each dispatch takes
        self.slow: set[str] = set()  # tasks that yield a few more times before they finish

    async def __call__(self, agent_id: str, task: TaskSpec) -> DispatchResult:
        self.started.append(task.id)
        if self.clock is not None:
            self.times.setdefault(task.id, self.clock())
            if self.duration:
                self.clock.advance(self.duration)
        for _ in range(5 if task.id in self.slow else 1):
            await anyio.lowlevel.checkpoint()
        self.finished.append(task.id)
        if self.failures.get(task.id, 0) > 0:
            self.failures[task.id] -= 1
            return DispatchResult(success=False, error=f"{task.id} failed on purpose")
        return DispatchResult(success=True, output=f"{task.id} by {agent_id}")


def make(clock: ManualClock | None = None, **settings: Any) -> StigmergyScheduler:
    return StigmergyScheduler(clock=clock, **settings)


@asynccontextmanager
async def running(scheduler: StigmergyScheduler) -> AsyncIterator[list[RunSummary]]:
    """Run the scheduler in the background; yields a list that receives the summary."""
    result: list[RunSummary] = []

    async def run() -> None:
        result.append(await scheduler.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        yield result
        if not result:
            scheduler.stop()


async def settle() -> None:
    await anyio.wait_all_tasks_blocked()


# -- the stigmergy-scheduler API ----------------------------------------------------------


async def test_the_stigmergy_scheduler_example_runs_unchanged() -> None:
    scheduler = StigmergyScheduler(wake_threshold=0.4)
    order: list[str] = []

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        order.append(task.id)
        return DispatchResult(success=True, output=f"done {task.description}")

    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec(id="draft", description="Write draft", agent_id="writer", priority=0.8))
    await scheduler.add_task(
        TaskSpec(
            id="review",
            description="Review draft",
            agent_id="reviewer",
            dependencies=["draft"],
            priority=0.6,
        )
    )
    summary = await scheduler.run()
    assert order == ["draft", "review"]
    assert summary.ok and summary.outputs == {"draft": "done Write draft", "review": "done Review draft"}
    assert scheduler.is_complete()
    metrics = scheduler.get_metrics()
    assert (metrics.total_dispatches, metrics.total_completions, metrics.total_failures) == (2, 2, 0)
    assert metrics.pending_tasks == 0 and sorted(metrics.completed_tasks) == ["draft", "review"]
    assert metrics.running_agents == [] and metrics.total_ticks >= 1
    assert set(metrics.agent_pressures) == {"writer", "reviewer"}


async def test_start_and_stop_on_asyncio_like_stigmergy_scheduler(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("start() returns an asyncio.Task; on trio, run() goes in a nursery")
    scheduler = make()
    scheduler.set_dispatcher(Recorder())
    task = scheduler.start()
    await scheduler.add_task(TaskSpec("a", "", "x"))
    summary = await task
    assert summary.ok and summary.outcomes["a"].attempts == 1


async def test_inject_urgent_goes_before_the_agents_other_tasks() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock)
    scheduler.set_dispatcher(recorder)
    for i in range(3):
        await scheduler.add_task(TaskSpec(f"routine-{i}", "", "solo", priority=0.5))
    urgent = TaskSpec("urgent", "", "solo", priority=0.1)
    await scheduler.inject_urgent(urgent)
    assert urgent.priority == 0.9
    await scheduler.run()
    assert recorder.started[0] == "urgent"


async def test_each_agent_runs_one_task_at_a_time_unless_told_otherwise() -> None:
    busy: dict[str, int] = {}
    most: dict[str, int] = {}
    total = {"now": 0, "most": 0}

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        busy[agent_id] = busy.get(agent_id, 0) + 1
        total["now"] += 1
        most[agent_id] = max(most.get(agent_id, 0), busy[agent_id])
        total["most"] = max(total["most"], total["now"])
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        busy[agent_id] -= 1
        total["now"] -= 1
        return DispatchResult(True)

    scheduler = make(max_concurrency=3)
    scheduler.set_dispatcher(dispatch)
    scheduler.register_agent("wide", concurrency=2)
    for agent in ("solo", "wide", "other", "more"):
        for i in range(4):
            await scheduler.add_task(TaskSpec(f"{agent}-{i}", "", agent))
    assert (await scheduler.run()).ok
    assert most == {"solo": 1, "wide": 2, "other": 1, "more": 1}
    assert total["most"] == 3


# -- pressure -----------------------------------------------------------------------------


async def test_a_task_under_threshold_wakes_when_waiting_carries_it_over() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock, aging_rate=0.02)  # threshold 0.4; priority 0.2 needs 10 s
    scheduler.set_dispatcher(recorder)
    events = scheduler.events()
    await scheduler.add_task(TaskSpec("low", "", "a", priority=0.2))
    async with running(scheduler):
        clock.advance(9.9)
        await settle()
        assert recorder.started == []
        assert await scheduler.pressure("low") == pytest.approx(0.2 + 0.02 * 9.9)
        clock.advance(0.1)
        await settle()
        assert recorder.started == ["low"]
    started = [e async for e in events if e.kind == "task_started"]
    assert started[0].pressure == pytest.approx(0.4) and started[0].at == pytest.approx(10.0)


async def test_aging_bounds_the_wait_of_a_low_priority_task_behind_a_stream_of_urgent_ones() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    recorder.duration = 1.0
    scheduler = make(clock, aging_rate=0.02)
    fresh = iter(range(1000))

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        result = await recorder(agent_id, task)
        if task.id != "low" and "low" not in recorder.started:
            await scheduler.add_task(TaskSpec(f"hot-{next(fresh)}", "", "a", priority=0.9))
        return result

    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("low", "", "a", priority=0.0))
    await scheduler.add_task(TaskSpec("hot-first", "", "a", priority=0.9))
    await scheduler.run()
    # A fresh 0.9 task outranks "low" until "low" has waited (0.9 - 0.0) / aging_rate = 45 s
    # (at a tie the older task goes first).
    assert recorder.times["low"] == pytest.approx(45.0)


async def test_a_dependent_starts_when_its_dependency_completes_not_at_the_next_tick() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock, tick_interval=3600.0)
    scheduler.set_dispatcher(recorder)
    for i in range(5):
        await scheduler.add_task(TaskSpec(f"t{i}", "", f"agent-{i}", dependencies=[f"t{i - 1}"] if i else []))
    summary = await scheduler.run()  # the clock never moves: no tick, no timer is waited for
    assert summary.ok and recorder.started == [f"t{i}" for i in range(5)]
    assert clock() == 0.0


async def test_completed_dependencies_pull_a_task_ahead_of_fresh_work_of_the_same_priority() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock)
    scheduler.set_dispatcher(recorder)
    recorder.slow.add("blocker")  # "dep" completes while "blocker" still holds agent b
    await scheduler.add_task(TaskSpec("dep", "", "a"))
    await scheduler.add_task(TaskSpec("blocker", "", "b", priority=1.0))
    await scheduler.add_task(TaskSpec("fresh", "", "b", priority=0.5))
    await scheduler.add_task(TaskSpec("pulled", "", "b", priority=0.5, dependencies=["dep"]))
    await scheduler.run()
    assert recorder.started.index("pulled") < recorder.started.index("fresh")
    assert DEPENDENCY_PULL > 0


async def test_a_deposit_at_a_waiting_tasks_region_wakes_it_at_once() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock)
    scheduler.set_dispatcher(recorder)
    await scheduler.add_task(TaskSpec("quiet", "", "a", priority=0.1))
    async with running(scheduler) as result:
        assert recorder.started == []
        await scheduler.field.deposit("planner", "needed_now", 0.5, region="quiet")
        await settle()
        assert recorder.started == ["quiet"]
        assert result and result[0].ok
    assert clock() == 0.0


async def test_an_inhibition_at_a_tasks_region_holds_it_while_the_agent_runs_its_others() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    scheduler = make(clock)
    scheduler.set_dispatcher(recorder)
    await scheduler.field.inhibit(region="held", agent_id="reviewer", intensity=-1.0, target_agent_id="a")
    await scheduler.add_task(TaskSpec("held", "", "a", priority=0.9))
    await scheduler.add_task(TaskSpec("other", "", "a", priority=0.5))
    async with running(scheduler):
        await settle()
        assert recorder.started == ["other"]
        assert scheduler.status("held") is TaskStatus.READY
        await scheduler.field.clear_region("held")
        await settle()
        assert recorder.started == ["other", "held"]


# -- failures and retries -----------------------------------------------------------------


def backoff_end(
    priority: float, threshold: float, aging: float, inhibition: float, half_life: float
) -> float:
    """Seconds after a failure until priority + aging*w - inhibition*2**(-w/h) reaches the threshold."""
    low, high = 0.0, 1000.0
    for _ in range(200):
        mid = (low + high) / 2
        if priority + aging * mid - inhibition * 2 ** (-mid / half_life) >= threshold:
            high = mid
        else:
            low = mid
    return high


async def test_a_failed_attempt_backs_off_until_its_inhibition_decays_then_retries() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    recorder.failures["flaky"] = 1
    scheduler = make(clock, aging_rate=0.02, retry_inhibition=0.5, retry_half_life=1.0)
    scheduler.set_dispatcher(recorder)
    events = scheduler.events()
    await scheduler.add_task(TaskSpec("flaky", "", "a", priority=0.5))
    expected = backoff_end(0.5, 0.4, 0.02, 0.5, 1.0)
    async with running(scheduler):
        assert recorder.started == ["flaky"]
        clock.advance(expected - 0.01)
        await settle()
        assert recorder.started == ["flaky"]
        assert await scheduler.pressure("flaky") < 0.4
        clock.advance(0.02)
        await settle()
        assert recorder.started == ["flaky", "flaky"]
    kinds = [(e.kind, e.attempt) async for e in events]
    assert kinds == [
        ("task_created", 0),
        ("task_started", 1),
        ("task_retried", 1),
        ("task_started", 2),
        ("task_completed", 2),
    ]
    assert scheduler.get_metrics().total_failures == 1 and scheduler.get_metrics().total_retries == 1


async def test_past_max_attempts_a_task_fails_for_good_and_its_dependents_are_cancelled() -> None:
    clock = ManualClock()
    recorder = Recorder(clock)
    recorder.duration = 5.0  # each attempt takes long enough for the back-off to lift
    recorder.failures["root"] = 99
    scheduler = make(clock, max_attempts=3)
    scheduler.set_dispatcher(recorder)
    events = scheduler.events()
    await scheduler.add_task(TaskSpec("root", "", "a"))
    await scheduler.add_task(TaskSpec("child", "", "b", dependencies=["root"]))
    await scheduler.add_task(TaskSpec("grandchild", "", "c", dependencies=["child"]))
    await scheduler.add_task(TaskSpec("bystander", "", "d"))
    async with running(scheduler) as result:
        for _ in range(20):
            if result:
                break
            clock.advance(5.0)
            await settle()
    summary = result[0]
    assert summary.outcomes["root"].status is TaskStatus.FAILED
    assert summary.outcomes["root"].attempts == 3
    assert summary.outcomes["root"].error == "root failed on purpose"
    assert set(summary.cancelled) == {"child", "grandchild"}
    assert "root" in summary.errors["child"]  # type: ignore[operator]
    assert summary.outcomes["bystander"].status is TaskStatus.COMPLETED
    assert not summary.ok and not summary.stopped
    seen = [(e.kind, e.task_id) async for e in events if e.kind in ("task_failed", "task_cancelled")]
    assert seen[0] == ("task_failed", "root")
    assert sorted(seen[1:]) == [("task_cancelled", "child"), ("task_cancelled", "grandchild")]
    assert recorder.started.count("child") == 0


async def test_a_task_added_after_its_dependency_failed_is_cancelled_at_once() -> None:
    recorder = Recorder()
    recorder.failures["root"] = 99
    scheduler = make(max_attempts=1)
    scheduler.set_dispatcher(recorder)
    await scheduler.add_task(TaskSpec("root", "", "a"))
    await scheduler.run()
    await scheduler.add_task(TaskSpec("late", "", "b", dependencies=["root"]))
    assert scheduler.status("late") is TaskStatus.CANCELLED


async def test_a_dispatcher_that_raises_is_a_failed_attempt_with_its_traceback_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        raise RuntimeError("the model said no")

    scheduler = make(max_attempts=1)
    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("boom", "", "a"))
    with caplog.at_level(logging.ERROR, logger="stigmergy.scheduler"):
        summary = await scheduler.run()
    assert summary.outcomes["boom"].error == "RuntimeError: the model said no"
    record = next(r for r in caplog.records if "boom" in r.getMessage())
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


async def test_a_dispatcher_over_its_timeout_is_cancelled_and_counted_as_failed() -> None:
    cancelled = []

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(task.id)
        raise AssertionError("unreachable")

    scheduler = make(max_attempts=2, retry_inhibition=0.0)
    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("slow", "", "a", timeout=0.01))
    summary = await scheduler.run()
    outcome = summary.outcomes["slow"]
    assert outcome.status is TaskStatus.FAILED and outcome.attempts == 2
    assert outcome.error == "timed out after 0.01s (attempt 2)"
    assert cancelled == ["slow", "slow"]


async def test_a_dispatcher_that_returns_something_else_fails_with_a_clear_message() -> None:
    async def dispatch(agent_id: str, task: TaskSpec) -> Any:
        return "ok"

    scheduler = make(max_attempts=1)
    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("odd", "", "a"))
    summary = await scheduler.run()
    assert summary.outcomes["odd"].error == "the dispatcher returned str; it must return a DispatchResult"


# -- bad graphs and bad input -------------------------------------------------------------


async def test_a_duplicate_id_is_refused() -> None:
    scheduler = make()
    await scheduler.add_task(TaskSpec("a", "", "x"))
    with pytest.raises(DuplicateTaskError, match="'a' was already added"):
        await scheduler.add_task(TaskSpec("a", "", "y"))


async def test_cycles_are_refused_when_the_closing_task_is_added() -> None:
    scheduler = make()
    with pytest.raises(DependencyCycleError, match="depends on itself"):
        await scheduler.add_task(TaskSpec("self", "", "x", dependencies=["self"]))
    await scheduler.add_task(TaskSpec("a", "", "x", dependencies=["c"]))
    await scheduler.add_task(TaskSpec("b", "", "x", dependencies=["a"]))
    with pytest.raises(DependencyCycleError, match="c -> b -> a -> c"):
        await scheduler.add_task(TaskSpec("c", "", "x", dependencies=["b"]))
    assert "c" not in scheduler.get_metrics().completed_tasks
    with pytest.raises(KeyError):
        scheduler.status("c")


async def test_unknown_dependencies_are_refused_at_run_with_the_tasks_that_need_them() -> None:
    scheduler = make()
    scheduler.set_dispatcher(Recorder())
    await scheduler.add_task(TaskSpec("a", "", "x", dependencies=["ghost"]))
    with pytest.raises(UnknownDependencyError, match="'ghost' \\(needed by 'a'\\)"):
        await scheduler.run()


async def test_dependencies_may_be_added_later_in_the_same_batch() -> None:
    scheduler = make()
    recorder = Recorder()
    scheduler.set_dispatcher(recorder)
    await scheduler.add_task(TaskSpec("second", "", "x", dependencies=["first"]))
    await scheduler.add_task(TaskSpec("first", "", "y"))
    assert (await scheduler.run()).ok and recorder.started == ["first", "second"]


async def test_a_dependency_that_never_comes_while_running_ends_the_run_with_an_error() -> None:
    clock = ManualClock()
    scheduler = make(clock, tick_interval=1.0)
    scheduler.set_dispatcher(Recorder(clock))
    errors: list[UnknownDependencyError] = []

    async def run() -> None:
        try:
            await scheduler.run()
        except UnknownDependencyError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await settle()
        await scheduler.add_task(TaskSpec("waits", "", "x", dependencies=["never"]))
        clock.advance(0.5)
        await settle()
        assert not errors  # it may still come: wait a tick
        clock.advance(1.0)
        await settle()
    assert "'never' (needed by 'waits')" in str(errors[0])


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (TaskSpec("", "", "x"), "task id must be a non-empty string"),
        (TaskSpec("a", "", ""), "agent_id of task 'a' must be a non-empty string"),
        (TaskSpec("a", "", "x", priority=1.5), "priority must be a number in \\[0, 1\\]"),
        (TaskSpec("a", "", "x", priority=math.nan), "priority must be a number"),
        (TaskSpec("a", "", "x", dependencies="b"), "dependencies must be a list of ids"),  # type: ignore[arg-type]
        (TaskSpec("a", "", "x", max_attempts=0), "max_attempts must be a whole number >= 1"),
        (TaskSpec("a", "", "x", timeout=-1), "timeout must be a finite number of seconds > 0"),
        (TaskSpec("a", "", "x", wake_threshold=2), "wake_threshold must be a number in \\[0, 1\\]"),
    ],
)
async def test_malformed_tasks_are_refused_with_a_message_that_names_the_field(
    task: TaskSpec, message: str
) -> None:
    with pytest.raises(InvalidTaskError, match=message):
        await make().add_task(task)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"wake_threshold": 1.5}, "wake_threshold must be a number in \\[0, 1\\]"),
        ({"tick_interval": 0}, "tick_interval must be a finite number of seconds > 0"),
        ({"aging_rate": 0}, "aging_rate"),
        ({"max_attempts": 0}, "max_attempts must be a whole number >= 1"),
        ({"agent_concurrency": 1.5}, "agent_concurrency"),
    ],
)
def test_bad_settings_are_configuration_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StigmergyScheduler(**settings)


async def test_run_without_a_dispatcher_says_what_to_do() -> None:
    with pytest.raises(ConfigurationError, match="set_dispatcher"):
        await make().run()


# -- adaptive planning, stop, events ------------------------------------------------------


async def test_tasks_added_by_a_running_task_join_the_same_run() -> None:
    scheduler = make()
    order: list[str] = []

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        order.append(task.id)
        if task.id == "plan":
            for step in ("step-1", "step-2"):
                await scheduler.add_task(TaskSpec(step, "", "worker", dependencies=["plan"]))
            await scheduler.add_task(TaskSpec("report", "", "writer", dependencies=["step-1", "step-2"]))
        return DispatchResult(True, task.id)

    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("plan", "", "planner"))
    summary = await scheduler.run()
    assert summary.ok and set(summary.outcomes) == {"plan", "step-1", "step-2", "report"}
    assert order[0] == "plan" and order[-1] == "report"


async def test_stop_lets_running_attempts_finish_and_starts_nothing_new() -> None:
    release = anyio.Event()
    started: list[str] = []

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        started.append(task.id)
        await release.wait()
        return DispatchResult(True)

    scheduler = make()
    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("first", "", "a"))
    await scheduler.add_task(TaskSpec("second", "", "a"))
    async with running(scheduler) as result:
        assert started == ["first"]
        scheduler.stop()
        await settle()
        assert not result  # waiting for the running attempt
        release.set()
        await settle()
    summary = result[0]
    assert summary.stopped and started == ["first"]
    assert summary.outcomes["first"].status is TaskStatus.COMPLETED
    assert summary.outcomes["second"].status is TaskStatus.READY


async def test_stop_cancels_attempts_still_running_after_the_grace_period() -> None:
    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    scheduler = make(stop_grace=0.01)
    scheduler.set_dispatcher(dispatch)
    await scheduler.add_task(TaskSpec("stuck", "", "a"))
    async with running(scheduler) as result:
        scheduler.stop()
    outcome = result[0].outcomes["stuck"]
    assert outcome.status is TaskStatus.READY and outcome.attempts == 0
    assert outcome.error == "interrupted by stop() before it finished"


async def test_events_stream_and_json_lines_log_every_step(tmp_path: Path) -> None:
    clock = ManualClock(100.0)
    log = tmp_path / "events.jsonl"
    recorder = Recorder(clock)
    recorder.failures["b"] = 1
    recorder.duration = 10.0
    scheduler = make(clock, event_log=log, max_attempts=2, retry_inhibition=0.0)
    scheduler.set_dispatcher(recorder)
    stream = scheduler.events()
    await scheduler.add_task(TaskSpec("a", "", "x"))
    await scheduler.add_task(TaskSpec("b", "", "y", dependencies=["a"]))
    await scheduler.run()
    events: list[TaskEvent] = [e async for e in stream]
    assert [(e.kind, e.task_id, e.attempt) for e in events] == [
        ("task_created", "a", 0),
        ("task_created", "b", 0),
        ("task_started", "a", 1),
        ("task_completed", "a", 1),
        ("task_started", "b", 1),
        ("task_retried", "b", 1),
        ("task_started", "b", 2),
        ("task_completed", "b", 2),
    ]
    assert events[2].at == 100.0 and events[3].at == 110.0 and events[2].agent_id == "x"
    assert events[2].pressure == pytest.approx(0.5) and events[4].pressure == pytest.approx(0.6)
    assert events[5].error == "b failed on purpose"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(d["kind"], d["task_id"], d["attempt"]) for d in lines] == [
        (e.kind, e.task_id, e.attempt) for e in events
    ]
    assert lines[2]["at"] == 100.0 and lines[2]["time"] > 1.7e9


async def test_run_with_no_tasks_waits_for_one() -> None:
    scheduler = make()
    recorder = Recorder()
    scheduler.set_dispatcher(recorder)
    async with running(scheduler) as result:
        assert not result
        await scheduler.add_task(TaskSpec("late", "", "a"))
        await settle()
        assert result and result[0].ok


async def test_dispatch_is_a_coroutine_function_protocol() -> None:
    dispatch: Dispatch = Recorder()
    scheduler = make()
    scheduler.set_dispatcher(dispatch)
    with pytest.raises(ConfigurationError, match="async callable"):
        scheduler.set_dispatcher("not callable")  # type: ignore[arg-type]


async def test_code_written_for_stigmergy_scheduler_passes_its_own_field() -> None:
    from stigmergy import ExponentialDecay, InMemoryFieldBackend, PheromoneField, RedisFieldBackend

    assert RedisFieldBackend.__name__ == "RedisFieldBackend"  # exported at the top, as there
    clock = ManualClock()
    field = PheromoneField(InMemoryFieldBackend(clock=clock), ExponentialDecay(half_life_seconds=300.0))
    scheduler = StigmergyScheduler(tick_interval=0.5, wake_threshold=0.4, field=field, clock=clock)
    assert scheduler.field is field
    recorder = Recorder(clock)
    recorder.failures["t"] = 1
    scheduler.set_dispatcher(recorder)
    await scheduler.add_task(TaskSpec("t", "", "a"))
    async with running(scheduler) as result:
        clock.advance(backoff_end(0.5, 0.4, 0.02, 0.5, 1.0) + 0.01)  # the back-off keeps its own half-life
        await settle()
        assert result and result[0].ok


async def test_forget_drops_finished_tasks_and_leaves_the_rest() -> None:
    recorder = Recorder()
    recorder.failures["bad"] = 9
    scheduler = make(max_attempts=1)
    scheduler.set_dispatcher(recorder)
    await scheduler.add_task(TaskSpec("good", "", "a"))
    await scheduler.add_task(TaskSpec("bad", "", "b"))
    await scheduler.add_task(TaskSpec("after-bad", "", "c", dependencies=["bad"]))
    await scheduler.run()
    await scheduler.add_task(TaskSpec("later", "", "a", dependencies=["good"]))  # ready, not run yet
    assert scheduler.forget(["good", "bad", "after-bad", "later", "unknown"]) == 3
    assert scheduler.get_metrics().pending_tasks == 1 and scheduler.status("later") is TaskStatus.READY
    with pytest.raises(KeyError):
        scheduler.status("good")
    assert (await scheduler.run()).outcomes.keys() == {"later"}
