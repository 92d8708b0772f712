"""StigmergyScheduler: tasks wake when the pressure on them crosses a threshold.

A ready task (dependencies completed) feels

    P = priority + pull + aging_rate * waited + field

``pull`` is :data:`~stigmergy.graph.DEPENDENCY_PULL` for a task whose dependencies
all completed; ``waited`` counts seconds since it became ready (or since its last
failed attempt), so every ready task crosses its threshold within
``(threshold - priority + inhibition) / aging_rate`` seconds and nothing starves;
``field`` is what the field holds at the task's region (``region=task.id``) for its
agent: the decaying back-off the scheduler deposits after a failed attempt, and
anything else deposited there.

The loop runs on anyio (asyncio or trio). It sleeps until the earliest of: the next
tick, the predicted moment a held-back task crosses, or a poke (an attempt ended, a
task was added, the field changed at a waiting task's region), so a dependent
starts as soon as its last dependency completes, whatever the tick interval. Each
tick evaporates the field and re-reads every agent's most pressed task, which
catches changes other processes made to a shared field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.clock import Clock, ManualClock, monotonic_clock
from stigmergy.decay import ExponentialDecay
from stigmergy.errors import ConfigurationError, TaskError
from stigmergy.events import EventBus, TaskEvent
from stigmergy.field import PheromoneField
from stigmergy.graph import TaskGraph, TaskRecord
from stigmergy.ledger import LedgerEntry, TaskLedger
from stigmergy.tasks import (
    AgentDispatcher,
    DispatchResult,
    RunSummary,
    SchedulerMetrics,
    TaskOutcome,
    TaskSpec,
    TaskStatus,
    check_agent_id,
    check_attempts,
    check_positive,
    check_task,
)

logger = logging.getLogger(__name__)

#: The signal type of the back-off deposited at a task's region after a failed attempt.
BACKOFF_SIGNAL = "task_backoff"
#: Who the scheduler's own deposits come from.
SCHEDULER_AGENT = "stigmergy.scheduler"
#: ``inject_urgent`` raises a task's priority to at least this (as stigmergy-scheduler does).
URGENT_PRIORITY = 0.9
#: Slack for float noise when comparing a pressure with its threshold.
_EPSILON = 1e-9


@dataclass(slots=True)
class _Agent:
    concurrency: int = 1
    wake_threshold: float | None = None
    running: int = 0


def _fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _positive(value: Any, what: str) -> float:
    try:
        return check_positive(value, what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _count(value: Any, what: str) -> int:
    try:
        return check_attempts(value, what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _result_error(result: Any) -> str | None:
    """Why a dispatcher's return value is a failed attempt, or None for success."""
    if not isinstance(result, DispatchResult):
        return f"the dispatcher returned {type(result).__name__}; it must return a DispatchResult"
    if not result.success:
        return result.error or "the dispatcher reported failure without an error message"
    return None


class StigmergyScheduler:
    """Pressure-field task scheduler: the stigmergy-scheduler 0.2 API, plus retries, timeouts and events.

    The first five parameters are those of stigmergy-scheduler. ``decay_half_life``
    and ``evaporation_threshold`` configure the field the scheduler creates when
    none is given. The rest are keyword-only:

    - ``max_attempts`` (default 3) and ``timeout`` (seconds, default none): per
      attempt, unless a task sets its own.
    - ``aging_rate``: pressure a ready task gains per second of waiting (> 0).
    - ``retry_inhibition`` and ``retry_half_life``: the back-off after a failed
      attempt is an inhibition of ``retry_inhibition * 2**(attempt-1)`` (at most 1)
      at the task's region, decaying with that half-life.
    - ``agent_concurrency``: tasks one agent runs at once (1, as in
      stigmergy-scheduler; per agent via :meth:`register_agent`); ``max_concurrency``
      caps all agents together.
    - ``stop_grace``: seconds :meth:`stop` lets running attempts finish.
    - ``clock``: what waits are measured on (a :class:`ManualClock` in tests).
    - ``event_log``: a file that receives every :class:`TaskEvent` as a JSON line.
    - ``ledger``: a shared :class:`~stigmergy.ledger.TaskLedger` (with a Redis
      field, a :class:`~stigmergy.backends.redis_ledger.RedisTaskLedger`): schedulers
      in many processes then share one task set. Each attempt holds a ``lease``
      (seconds, renewed while it runs) under ``worker_id`` (default: host, pid and
      a random suffix); a task whose worker dies is taken over when its lease ends.
    """

    def __init__(
        self,
        tick_interval: float = 1.0,
        wake_threshold: float = 0.4,
        decay_half_life: float = 300.0,
        evaporation_threshold: float = 0.01,
        field: PheromoneField | None = None,
        *,
        max_attempts: int = 3,
        timeout: float | None = None,
        aging_rate: float = 0.02,
        retry_inhibition: float = 0.5,
        retry_half_life: float = 1.0,
        agent_concurrency: int = 1,
        max_concurrency: int | None = None,
        stop_grace: float = 10.0,
        clock: Clock | None = None,
        event_log: str | Path | None = None,
        ledger: TaskLedger | None = None,
        worker_id: str | None = None,
        lease: float = 30.0,
    ) -> None:
        self._tick_interval = _positive(tick_interval, "tick_interval")
        self._wake_threshold = _fraction(wake_threshold, "wake_threshold")
        self._max_attempts = _count(max_attempts, "max_attempts")
        self._timeout = None if timeout is None else _positive(timeout, "timeout")
        self._aging_rate = _positive(aging_rate, "aging_rate (> 0, so that nothing starves)")
        self._retry_inhibition = _fraction(retry_inhibition, "retry_inhibition")
        retry_half_life = _positive(retry_half_life, "retry_half_life")
        self._agent_concurrency = _count(agent_concurrency, "agent_concurrency")
        self._max_concurrency = (
            None if max_concurrency is None else _count(max_concurrency, "max_concurrency")
        )
        self._stop_grace = _positive(stop_grace, "stop_grace")
        self._clock: Clock = clock if clock is not None else monotonic_clock
        backoff = {BACKOFF_SIGNAL: ExponentialDecay(retry_half_life)}
        if field is None:
            field = PheromoneField(
                InMemoryFieldBackend(clock=self._clock),
                ExponentialDecay(_positive(decay_half_life, "decay_half_life")),
                evaporation_threshold,
                decay_by_type=backoff,
            )
        else:
            for signal_type, strategy in backoff.items():
                field.policy.by_type.setdefault(signal_type, strategy)
        self._field = field
        field.on_change(self._on_field_change)
        if isinstance(self._clock, ManualClock):
            self._clock.subscribe(self._poke)

        self._graph = TaskGraph(self._aging_rate)
        self._agents: dict[str, _Agent] = {}
        self._dispatcher: AgentDispatcher | None = None
        self._events = EventBus(event_log)
        self._metrics = SchedulerMetrics()
        self._running: dict[str, TaskRecord] = {}
        self._dirty: dict[str, None] = {}  # agents to evaluate, in order
        self._capped: dict[str, None] = {}  # agents that waited for the global cap
        self._alarms: list[tuple[float, int, str, str]] = []  # (when, seq, "agent"|"held", id)
        self._held: set[str] = set()
        self._seq = itertools.count()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._wake: anyio.Event | None = None
        self._poked = False
        self._stopping = False
        self._drained: anyio.Event | None = None
        self._background: asyncio.Task[RunSummary] | None = None
        self._failure: Exception | None = None
        self._ledger = ledger
        self._claiming = 0  # claims in flight (each holds a slot)
        self._worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = _positive(lease, "lease")
        self.takeovers: dict[str, str] = {}  # task id -> the dead worker this one took it over from

    # -- the stigmergy-scheduler API ----------------------------------------------------

    @property
    def field(self) -> PheromoneField:
        """The field the scheduler reads (and deposits back-off into)."""
        return self._field

    def register_agent(
        self, agent_id: str, *, concurrency: int | None = None, wake_threshold: float | None = None
    ) -> None:
        """Declare an agent; optionally how many tasks it runs at once and its own threshold."""
        agent = self._agent(check_agent_id(agent_id))
        if concurrency is not None:
            agent.concurrency = _count(concurrency, f"concurrency of agent {agent_id!r}")
        if wake_threshold is not None:
            agent.wake_threshold = _fraction(wake_threshold, f"wake_threshold of agent {agent_id!r}")
        self._mark(agent_id)

    def set_dispatcher(self, dispatcher: AgentDispatcher) -> None:
        """Set the coroutine function ``(agent_id, task) -> DispatchResult`` that runs a task."""
        if not callable(dispatcher):
            raise ConfigurationError(f"the dispatcher must be an async callable, got {dispatcher!r}")
        self._dispatcher = dispatcher

    async def add_task(self, task: TaskSpec) -> None:
        """Add a task, also while running; raises a :class:`~stigmergy.errors.TaskError` for a bad one.

        Dependencies may name tasks added later; :meth:`run` refuses to wait for
        ones that never come. Adding does not yield to the loop, so a batch of
        ``add_task`` calls lands as a whole.
        """
        check_task(task)
        if self._ledger is not None:
            await self._ledger.publish(task.id, dataclasses.asdict(task))
            if task.id in self._graph.tasks:
                return  # another worker published the same task first
        self._add(task)

    def _add(self, task: TaskSpec) -> None:
        now = self._clock()
        record = self._graph.add(task, now)
        self._agent(task.agent_id)
        self._emit("task_created", record, now)
        if record.status is TaskStatus.CANCELLED:
            self._emit("task_cancelled", record, now, error=record.error)
        self._mark(task.agent_id)

    async def inject_urgent(self, task: TaskSpec) -> None:
        """Add a task with priority raised to at least 0.9: it goes before everything else its agent has."""
        task.priority = max(task.priority, URGENT_PRIORITY)
        await self.add_task(task)

    async def run(self) -> RunSummary:
        """Schedule until every task is completed, failed or cancelled, or :meth:`stop`; returns outcomes.

        With no task added yet it waits for one. Raises
        :class:`~stigmergy.errors.UnknownDependencyError` at once for dependencies no
        task provides (with a ledger: once the loop has been idle for a tick with
        tasks still waiting on such ids, since other workers may publish them). An
        error in the loop or the field (a backend that went away, say) cancels
        running attempts and is raised as itself, not wrapped in an exception group.
        """
        if self._dispatcher is None:
            raise ConfigurationError("no dispatcher: call set_dispatcher(fn) before run()")
        if self._task_group is not None:
            raise ConfigurationError("this scheduler is already running")
        if self._ledger is None:  # with a ledger, other workers may still publish them
            self._graph.check_resolved()
        self._stopping = False
        self._failure = None
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                if self._ledger is not None:
                    task_group.start_soon(self._guarded, self._follow, self._ledger)
                try:
                    await self._loop()
                    await self._drain()
                except Exception as exc:
                    self._failure = exc
                task_group.cancel_scope.cancel()
        finally:
            self._task_group = None
            self._events.close()
        if self._failure is not None:
            raise self._failure
        return RunSummary(
            {task_id: r.outcome() for task_id, r in self._graph.tasks.items()},
            stopped=not self._graph.all_final,
        )

    def start(self) -> asyncio.Task[RunSummary]:
        """Run in the background on asyncio; returns the task (on trio, start :meth:`run` in a nursery)."""
        self._background = asyncio.get_running_loop().create_task(self.run())
        return self._background

    def stop(self) -> None:
        """Stop gracefully: no new attempts; running ones get ``stop_grace`` seconds, then are cancelled."""
        self._stopping = True
        self._poke()

    async def tick(self) -> None:
        """One tick: evaporate, refresh metrics, and have the loop re-read every agent's most pressed task."""
        self._metrics.total_ticks += 1
        await self._field.decay()
        for agent_id in self._graph.agents_with_ready():
            self._mark(agent_id)
        if self._agents:
            self._metrics.agent_pressures = await self._field.read_pressures(list(self._agents))

    def is_complete(self) -> bool:
        """True once tasks exist and every one is completed, failed or cancelled."""
        return bool(self._graph.tasks) and self._graph.all_final

    def get_metrics(self) -> SchedulerMetrics:
        """A snapshot of counters and task lists."""
        m = self._metrics
        tasks = self._graph.tasks.values()
        return SchedulerMetrics(
            total_ticks=m.total_ticks,
            total_dispatches=m.total_dispatches,
            total_completions=m.total_completions,
            total_failures=m.total_failures,
            pending_tasks=sum(not r.status.final for r in tasks),
            completed_tasks=[r.spec.id for r in tasks if r.status is TaskStatus.COMPLETED],
            running_agents=sorted({r.spec.agent_id for r in self._running.values()}),
            agent_pressures=dict(m.agent_pressures),
            total_retries=m.total_retries,
            failed_tasks=[r.spec.id for r in tasks if r.status is TaskStatus.FAILED],
            cancelled_tasks=[r.spec.id for r in tasks if r.status is TaskStatus.CANCELLED],
        )

    # -- ours ---------------------------------------------------------------------------

    def events(self) -> AsyncIterator[TaskEvent]:
        """Every lifecycle event from now until the run ends: ``async for event in scheduler.events()``."""
        return self._events.subscribe()

    def forget(self, task_ids: Iterable[str]) -> int:
        """Drop those of ``task_ids`` that finished (completed, failed or cancelled); returns how many.

        A long-lived scheduler (one per process, serving run after run) stays small.
        Forgotten ids are unknown again: a task added later cannot depend on them.
        Unknown and unfinished ids are left as they are.
        """
        finished = [t for t in task_ids if t in self._graph.tasks and self._graph.tasks[t].status.final]
        for task_id in finished:
            self._graph.forget(task_id)
        return len(finished)

    def status(self, task_id: str) -> TaskStatus:
        """Where a task is now; raises KeyError for an unknown id."""
        return self._graph.tasks[task_id].status

    async def pressure(self, task_id: str) -> float:
        """A ready task's pressure now (what it is compared with its threshold)."""
        record = self._graph.tasks[task_id]
        return self._graph.pressure_without_field(record, self._clock()) + await self._field_term(record)

    # -- the loop -----------------------------------------------------------------------

    async def _loop(self) -> None:
        next_tick = self._clock()
        idle_since: float | None = None
        while not self._stopping and not self.is_complete():
            now = self._clock()
            if now >= next_tick:
                await self.tick()
                next_tick = now + self._tick_interval
            self._fire_alarms(now)
            for record in await self._decide():
                self._spawn(record)
            if self._graph.missing and not self._running and not self._held and not self._alarms:
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= self._tick_interval:
                    self._graph.check_resolved()
            else:
                idle_since = None
            deadline = min(next_tick, self._alarms[0][0]) if self._alarms else next_tick
            await self._wait_until(deadline)

    async def _wait_until(self, deadline: float) -> None:
        if self._poked:
            self._poked = False
            await anyio.lowlevel.checkpoint()
            return
        self._wake = wake = anyio.Event()
        if isinstance(self._clock, ManualClock):
            await wake.wait()  # the clock pokes us when a test moves it
        else:
            with anyio.move_on_after(max(0.0, deadline - self._clock())):
                await wake.wait()
        self._poked = False

    def _poke(self) -> None:
        self._poked = True
        if self._wake is not None:
            self._wake.set()

    def _mark(self, agent_id: str) -> None:
        self._dirty[agent_id] = None
        self._poke()

    def _alarm(self, when: float, kind: str, key: str) -> None:
        heapq.heappush(self._alarms, (when, next(self._seq), kind, key))
        self._poke()  # the loop may be sleeping past it

    def _fire_alarms(self, now: float) -> None:
        while self._alarms and self._alarms[0][0] <= now:
            _, _, kind, key = heapq.heappop(self._alarms)
            if kind == "held":
                self._release(key)
            else:
                self._dirty[key] = None

    def _release(self, task_id: str) -> None:
        """A held-back task rejoins its agent's queue (its inhibition lifted, or the field changed)."""
        if task_id in self._held:
            self._held.discard(task_id)
            record = self._graph.tasks[task_id]
            if record.status is TaskStatus.READY:
                self._graph.push(record)
                self._dirty[record.spec.agent_id] = None

    def _on_field_change(self, regions: frozenset[str] | None) -> None:
        """Re-read the tasks whose region changed: a deposit can push one over (or hold it back)."""
        if regions is None:
            for task_id in list(self._held):
                self._release(task_id)
            for agent_id in self._graph.agents_with_ready():
                self._dirty[agent_id] = None
        else:
            for region in regions:
                self._release(region)
                record = self._graph.tasks.get(region)
                if record is not None and record.status is TaskStatus.READY:
                    self._dirty[record.spec.agent_id] = None
        self._poke()

    async def _decide(self) -> list[TaskRecord]:
        """Evaluate every agent marked since the last decision; returns the attempts begun."""
        begun: list[TaskRecord] = []
        while self._dirty and not self._stopping:
            agent_id = next(iter(self._dirty))
            del self._dirty[agent_id]
            await self._evaluate(agent_id, begun)
        return begun

    def _has_capacity(self, agent_id: str) -> bool:
        agent = self._agents[agent_id]
        if agent.running >= agent.concurrency or self._stopping:
            return False
        if self._max_concurrency is not None and len(self._running) + self._claiming >= self._max_concurrency:
            self._capped[agent_id] = None
            return False
        return True

    async def _evaluate(self, agent_id: str, begun: list[TaskRecord]) -> None:
        """Begin the agent's most pressed tasks while it has capacity and they are over threshold.

        The field is read between the checks, so every check is made again after it.
        """
        graph = self._graph
        while self._has_capacity(agent_id):
            record = graph.top(agent_id)
            if record is None:
                return
            field_term = await self._field_term(record)
            if graph.top(agent_id) is not record or not self._has_capacity(agent_id):
                continue  # the queue or the agent changed while we read the field
            now = self._clock()
            pressure = graph.pressure_without_field(record, now) + field_term
            threshold = self._threshold(record)
            if pressure >= threshold - _EPSILON:
                if self._ledger is None:
                    self._begin(record, pressure, now)
                    begun.append(record)
                else:
                    await self._claim(self._ledger, record, pressure, begun)
            elif field_term < 0:
                graph.take(record)  # held back by inhibition: let the agent's next task go meanwhile
                self._held.add(record.spec.id)
                self._alarm(await self._lift_time(record, threshold, now), "held", record.spec.id)
            else:
                crossing = now + (threshold - pressure) / self._aging_rate
                self._alarm(crossing, "agent", agent_id)
                return

    async def _claim(
        self, ledger: TaskLedger, record: TaskRecord, pressure: float, begun: list[TaskRecord]
    ) -> None:
        """With a shared ledger, an attempt begins only once this worker holds the task's lease.

        While the claim is in flight the task is off its queue and its agent's slot
        is reserved, so no other evaluation in this process can claim it too.
        """
        task_id, agent = record.spec.id, self._agents[record.spec.agent_id]
        self._graph.take(record)
        agent.running += 1
        self._claiming += 1
        try:
            claim = await ledger.claim(task_id, self._worker_id, self._lease)
        finally:
            agent.running -= 1
            self._claiming -= 1
        if claim.kind == "final":
            self._apply_outcome(task_id, claim.status, claim.payload)
        elif record.status is not TaskStatus.READY:  # it ended elsewhere while we asked
            if claim.kind == "granted":
                await ledger.release(task_id, self._worker_id)
        elif claim.kind == "busy":  # another worker runs it: look again when its lease would end
            self._held.add(task_id)
            self._alarm(self._clock() + claim.retry_after + 0.01, "held", task_id)
        else:
            record.attempts = claim.attempt - 1
            now = self._clock()
            if claim.taken_over_from is not None:
                self.takeovers[task_id] = claim.taken_over_from
                message = f"worker {claim.taken_over_from!r} died mid-attempt (its lease ran out); taken over"
                logger.warning("task %r: %s", task_id, message)
                self._emit("task_retried", record, now, error=message)
            self._begin(record, pressure, now)
            begun.append(record)

    def _apply_outcome(self, task_id: str, status: str | None, payload: Any) -> None:
        """Another worker ended a task: complete it (freeing its dependents) or fail it here too."""
        record = self._graph.tasks.get(task_id)
        if record is None or record.status.final or record.status is TaskStatus.RUNNING:
            return  # unknown yet, already known, or our own attempt that will settle itself
        self._held.discard(task_id)
        if status == "completed":
            for dependent in self._graph.complete(record, payload, self._clock()):
                self._dirty[dependent.spec.agent_id] = None
        else:
            self._graph.fail(record, str(payload))
        self._poke()

    async def _follow(self, ledger: TaskLedger) -> None:
        """Apply what other workers publish: new tasks, and outcomes that free our dependents."""
        async for entry in ledger.watch():
            self._apply_entry(entry)

    def _apply_entry(self, entry: LedgerEntry) -> None:
        if entry.kind != "spec":
            self._apply_outcome(entry.task_id, entry.kind, entry.payload)
        elif entry.task_id not in self._graph.tasks:
            try:
                spec = TaskSpec(**entry.payload)
                check_task(spec)
                self._add(spec)
            except (TypeError, TaskError) as exc:
                logger.error("skipping task %r from the shared ledger: %s", entry.task_id, exc)

    async def _renew(self, ledger: TaskLedger, task_id: str, scope: anyio.CancelScope) -> None:
        """Keep the lease of a running attempt alive (every third of the lease)."""
        with scope:
            while True:
                await anyio.sleep(self._lease / 3)
                if not await ledger.renew(task_id, self._worker_id, self._lease):
                    logger.warning("task %r: lost its lease (another worker may run it too)", task_id)
                    return

    def _threshold(self, record: TaskRecord) -> float:
        if record.spec.wake_threshold is not None:
            return record.spec.wake_threshold
        agent_threshold = self._agents[record.spec.agent_id].wake_threshold
        return self._wake_threshold if agent_threshold is None else agent_threshold

    async def _field_term(self, record: TaskRecord) -> float:
        return await self._field.read_pressure(agent_id=record.spec.agent_id, region=record.spec.id)

    async def _lift_time(self, record: TaskRecord, threshold: float, now: float) -> float:
        """When the task's pressure will cross its threshold, from the signals at its region now.

        Each signal's value at a future instant comes from its type's closed-form
        decay; the crossing is found by bisection (monotone for decaying
        inhibition). Checked again when it comes: a wrong guess costs one re-read.
        """
        explanation = await self._field.explain(record.spec.agent_id, region=record.spec.id)
        shift = explanation.at - now  # field clock minus scheduler clock
        parts = [c for c in explanation.contributions if c.value]
        policy = self._field.policy
        one = np.ones(1)
        salt = np.zeros(1, dtype=np.uint64)

        def field_at(t: float) -> float:
            total = 0.0
            for c in parts:
                age = t + shift - c.deposited_at
                if t + shift < c.evaporates_at:
                    value = policy.strategy(c.signal_type).apply(one * c.deposited_intensity, one * age, salt)
                    total += c.weight * float(value[0])
            return total

        def crossed(t: float) -> bool:
            return self._graph.pressure_without_field(record, t) + field_at(t) >= threshold

        worst = sum(abs(c.contribution) for c in parts)
        low = now
        shortfall = threshold + worst - self._graph.pressure_without_field(record, now)
        high = now + max(0.0, shortfall) / self._aging_rate
        for _ in range(60):
            if high - low < 1e-4:
                break
            middle = (low + high) / 2
            if crossed(middle):
                high = middle
            else:
                low = middle
        return high + 1e-6

    # -- attempts -----------------------------------------------------------------------

    def _begin(self, record: TaskRecord, pressure: float, now: float) -> None:
        self._graph.take(record)
        record.status = TaskStatus.RUNNING
        record.attempts += 1
        self._agents[record.spec.agent_id].running += 1
        self._running[record.spec.id] = record
        self._metrics.total_dispatches += 1
        self._emit("task_started", record, now, pressure=pressure)

    def _spawn(self, record: TaskRecord) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(
            self._guarded, self._work, record, name=f"stigmergy task {record.spec.id}"
        )

    async def _guarded(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a background part of the run; its error (the field or ledger failed) ends the run."""
        try:
            await work(*args)
        except Exception as exc:
            self._failure = self._failure or exc
            assert self._task_group is not None
            self._task_group.cancel_scope.cancel()

    async def _work(self, record: TaskRecord | None) -> None:
        """Run an attempt, then carry on with the next one it unblocked (no task spawned for it)."""
        while record is not None:
            await self._attempt(record)
            begun = await self._decide()
            record = begun.pop(0) if begun else None
            for other in begun:
                self._spawn(other)
            await anyio.lowlevel.checkpoint()  # instant dispatchers must not starve the loop
        self._poke()  # let the loop see whether the run is over

    async def _call(self, spec: TaskSpec) -> Any:
        """The dispatcher's answer; with a ledger, the lease is renewed while it works."""
        assert self._dispatcher is not None and self._task_group is not None
        if self._ledger is None:
            return await self._dispatcher(spec.agent_id, spec)
        renewal = anyio.CancelScope()
        self._task_group.start_soon(self._guarded, self._renew, self._ledger, spec.id, renewal)
        try:
            return await self._dispatcher(spec.agent_id, spec)
        finally:
            renewal.cancel()

    async def _attempt(self, record: TaskRecord) -> None:
        spec = record.spec
        timeout = spec.timeout if spec.timeout is not None else self._timeout
        result: Any = None
        error: str | None = None
        try:
            if timeout is None:
                result = await self._call(spec)
            else:
                with anyio.move_on_after(timeout) as scope:
                    result = await self._call(spec)
                if scope.cancelled_caught:
                    error = f"timed out after {timeout:g}s (attempt {record.attempts})"
            error = error or _result_error(result)
        except Exception as exc:
            logger.exception(
                "task %r raised on agent %r (attempt %d)", spec.id, spec.agent_id, record.attempts
            )
            error = f"{type(exc).__name__}: {exc}"
        except BaseException:
            self._interrupted(record)
            if self._ledger is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._ledger.release(spec.id, self._worker_id)
            raise
        await self._settle(record, result, error)

    def _interrupted(self, record: TaskRecord) -> None:
        """A running attempt was cancelled by stop(): it counts as not run."""
        record.attempts -= 1
        record.error = "interrupted by stop() before it finished"
        self._graph.retry(record, self._clock())
        self._free(record)

    def _free(self, record: TaskRecord) -> None:
        del self._running[record.spec.id]
        self._agents[record.spec.agent_id].running -= 1
        self._dirty[record.spec.agent_id] = None
        for agent_id in self._capped:
            self._dirty[agent_id] = None
        self._capped.clear()
        if not self._running and self._drained is not None:
            self._drained.set()

    async def _settle(self, record: TaskRecord, result: Any, error: str | None) -> None:
        spec = record.spec
        ledger, worker = self._ledger, self._worker_id
        if error is None:
            if ledger is not None:
                await ledger.finish(spec.id, worker, "completed", result.output)
            now = self._clock()
            self._metrics.total_completions += 1
            freed = self._graph.complete(record, result.output, now)
            self._emit("task_completed", record, now)
            for dependent in freed:
                self._dirty[dependent.spec.agent_id] = None
            self._free(record)
            return
        self._metrics.total_failures += 1
        record.error = error
        max_attempts = spec.max_attempts if spec.max_attempts is not None else self._max_attempts
        if record.attempts < max_attempts:
            logger.info(
                "task %r failed (attempt %d of %d): %s", spec.id, record.attempts, max_attempts, error
            )
            strength = min(1.0, self._retry_inhibition * 2 ** (record.attempts - 1))
            if strength > 0:
                await self._field.deposit(
                    SCHEDULER_AGENT,
                    BACKOFF_SIGNAL,
                    -strength,
                    {"task_id": spec.id, "attempt": record.attempts},
                    target_agent_id=spec.agent_id,
                    region=spec.id,
                )
            if ledger is not None:
                await ledger.release(spec.id, worker)
            now = self._clock()
            self._metrics.total_retries += 1
            self._graph.retry(record, now)
            self._emit("task_retried", record, now, error=error)
        else:
            logger.warning("task %r failed for good after %d attempt(s): %s", spec.id, record.attempts, error)
            if ledger is not None:
                await ledger.finish(spec.id, worker, "failed", error)
            now = self._clock()
            cancelled = self._graph.fail(record, error)
            self._emit("task_failed", record, now, error=error)
            for dependent in cancelled:
                self._emit("task_cancelled", dependent, now, error=dependent.error)
        self._free(record)

    async def _drain(self) -> None:
        """After stop(): give running attempts ``stop_grace`` seconds to finish."""
        if not self._running:
            return
        self._drained = anyio.Event()
        with anyio.move_on_after(self._stop_grace):
            await self._drained.wait()

    # -- helpers ------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> _Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(self._agent_concurrency)
        return agent

    def _emit(self, kind: Any, record: TaskRecord, now: float, **extra: Any) -> None:
        self._events.emit(kind, record.spec.id, record.spec.agent_id, record.attempts, now, **extra)


__all__ = [
    "AgentDispatcher",
    "DispatchResult",
    "RunSummary",
    "SchedulerMetrics",
    "StigmergyScheduler",
    "TaskOutcome",
    "TaskSpec",
    "TaskStatus",
]
