"""LangGraph on the pressure field: paced model calls and a task runner with real concurrency.

Two parts, both on the process's one field, gate and scheduler
(:class:`~stigmergy.integrations.langgraph_runtime.FieldRuntime`):

- :class:`StigmergyRateLimiter` and its :attr:`~StigmergyRateLimiter.callback`: any
  LangChain chat model's calls wait in the shared gate and deposit usage, time to
  first token and 429/529 errors, so every model call of every graph is paced.
- :class:`StigmergyRouter`, the stigmergy-langgraph API (``register_agent``,
  ``add_task``, ``build_graph``). The graph's one node hands the tasks to the shared
  scheduler, which starts each when its dependencies are done and its pressure
  crosses the threshold, retrying failures with back-off. Each attempt runs as a
  LangGraph Functional API task (``langgraph.func.task``), so sync nodes run in
  LangGraph's threads and async nodes are awaited, concurrently; each task sees the
  state with its completed predecessors' updates merged through the graph's
  reducers, and the node returns every update for LangGraph to merge the same way.

Needs the ``langgraph`` extra: ``pip install 'stigmergy-field[langgraph]'``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict

from stigmergy.errors import InvalidTaskError
from stigmergy.integrations.langgraph_models import StigmergyCallbackHandler, StigmergyRateLimiter
from stigmergy.integrations.langgraph_runtime import FieldRuntime, TaskBatch, extra_required
from stigmergy.tasks import TaskOutcome, TaskSpec, TaskStatus

try:
    from langchain_core.runnables import RunnableLambda
    from langgraph.channels import LastValue
    from langgraph.channels.base import BaseChannel
    from langgraph.func import task as lg_task
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.state import CompiledStateGraph
    from langgraph.types import Command
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise extra_required("langgraph", exc) from exc

__all__ = [
    "FieldRuntime",
    "PressureState",
    "StigmergyCallbackHandler",
    "StigmergyRateLimiter",
    "StigmergyRouter",
]

#: A LangGraph node: ``(state) -> update``, sync or async.
NodeFn = Callable[[dict[str, Any]], Any]


class PressureState(TypedDict, total=False):
    """The stigmergy-langgraph default state, plus ``errors`` (why each unfinished task stopped)."""

    messages: list[dict[str, Any]]
    completed_tasks: list[str]
    pending_tasks: list[str]
    outputs: dict[str, Any]
    errors: dict[str, str]


class StigmergyRouter:
    """Pressure-field routing for LangGraph: register agents and tasks, build a graph that runs them.

    ``wake_threshold`` applies to this router's tasks. ``decay_half_life`` and
    ``evaporation_threshold`` are accepted for stigmergy-langgraph compatibility; the
    shared field's own settings apply (pass ``runtime=FieldRuntime(...)`` for
    another field). ``max_attempts`` and ``timeout`` (seconds per attempt) default
    to the scheduler's (3 attempts, no timeout).
    """

    def __init__(
        self,
        wake_threshold: float = 0.4,
        decay_half_life: float = 300.0,
        evaporation_threshold: float = 0.01,
        *,
        runtime: FieldRuntime | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        node_name: str = "orchestrator",
    ) -> None:
        self.wake_threshold = wake_threshold
        self.decay_half_life = decay_half_life
        self.evaporation_threshold = evaporation_threshold
        self.runtime = runtime
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.node_name = node_name
        self._agents: dict[str, NodeFn] = {}
        self._concurrency: dict[str, int | None] = {}
        self._tasks: list[TaskSpec] = []

    def register_agent(self, name: str, node_fn: NodeFn, *, concurrency: int | None = None) -> None:
        """Register an agent's node function ``(state) -> update`` (sync or async).

        An agent runs one task at a time unless given a ``concurrency``; agent ids
        are shared by every graph in the process, as the scheduler is.
        """
        self._agents[name] = node_fn
        self._concurrency[name] = concurrency

    def add_task(
        self,
        task_id: str,
        agent: str,
        priority: float = 0.5,
        deps: list[str] | None = None,
        description: str = "",
        *,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Add a task for a registered agent; it runs once every task in ``deps`` completed."""
        if agent not in self._agents:
            raise ValueError(f"Agent '{agent}' not registered. Call register_agent first.")
        self._tasks.append(
            TaskSpec(
                id=task_id,
                description=description or task_id,
                agent_id=agent,
                priority=priority,
                dependencies=list(deps or []),
                max_attempts=max_attempts if max_attempts is not None else self.max_attempts,
                timeout=timeout if timeout is not None else self.timeout,
                wake_threshold=self.wake_threshold,
            )
        )

    def build_graph(self, state_schema: type[Any] = PressureState) -> CompiledStateGraph[Any, Any, Any, Any]:
        """A compiled graph whose one node runs every task not yet in ``state["completed_tasks"]``."""
        builder: StateGraph[Any, Any, Any, Any] = StateGraph(state_schema)
        runner = _Runner(
            dict(self._agents), list(self._tasks), dict(self._concurrency), builder.channels, self
        )
        node: Any = RunnableLambda(runner.invoke, afunc=runner.ainvoke, name=self.node_name)
        builder.add_node(self.node_name, node)
        builder.add_edge(START, self.node_name)
        builder.add_edge(self.node_name, END)
        return builder.compile()


class _Runner:
    """The graph's node: each invocation is one batch of tasks in the shared scheduler."""

    def __init__(
        self,
        agents: dict[str, NodeFn],
        tasks: list[TaskSpec],
        concurrency: dict[str, int | None],
        channels: Mapping[str, BaseChannel[Any, Any, Any]],
        router: StigmergyRouter,
    ) -> None:
        self.agents, self.tasks, self.concurrency, self.channels = agents, tasks, concurrency, channels
        self.router = router

    def invoke(self, state: dict[str, Any]) -> list[Command[Any]]:
        """``graph.invoke``: attempts run as LangGraph tasks in its threads; this thread waits."""
        asynchronous = sorted(a for a, fn in self.agents.items() if inspect.iscoroutinefunction(fn))
        if asynchronous:
            raise TypeError(f"agents {asynchronous} have async node functions: run the graph with ainvoke")
        run = _Invocation(self, state)
        return run.result(self._batch(run, run.attempt).run())

    async def ainvoke(self, state: dict[str, Any]) -> list[Command[Any]]:
        """``graph.ainvoke``: attempts run as LangGraph tasks on this loop (sync ones in threads)."""
        run = _Invocation(self, state)
        return run.result(await self._batch(run, run.aattempt).arun())

    def _batch(self, run: _Invocation, attempt: Callable[[TaskSpec], Any]) -> TaskBatch:
        todo = [t for t in self.tasks if t.id not in run.done]
        agents = {t.agent_id: self.concurrency.get(t.agent_id) for t in todo}
        return TaskBatch(todo, attempt, runtime=self.router.runtime, done=run.done, agents=agents)


class _Invocation:
    """One graph invocation: the state its tasks see, and the updates they returned, in order."""

    def __init__(self, runner: _Runner, state: dict[str, Any]) -> None:
        self.runner = runner
        self.state = dict(state)
        self.view = dict(state)  # the state plus every completed task's update, merged
        self.updates: list[tuple[str, Any]] = []
        self.done = frozenset(state.get("completed_tasks") or ())
        self._lock = threading.Lock()

    def _node(self, spec: TaskSpec) -> Any:
        """The LangGraph task for one attempt, named after it (its checkpoint identity)."""
        fn = self.runner.agents[spec.agent_id]
        name = "stigmergy." + "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.id)
        with self._lock:
            state = {**self.view, "_current_task": spec.id, "_task_description": spec.description}
        if inspect.iscoroutinefunction(fn):

            async def run_async(state: dict[str, Any]) -> Any:
                return await fn(state)

            run_async.__name__ = name
            return lg_task(run_async)(state)

        def run(state: dict[str, Any]) -> Any:
            return fn(state)

        run.__name__ = name
        return lg_task(run)(state)

    def attempt(self, spec: TaskSpec) -> Any:
        return self._record(spec, self._node(spec).result())

    async def aattempt(self, spec: TaskSpec) -> Any:
        return self._record(spec, await self._node(spec))

    def _record(self, spec: TaskSpec, update: Any) -> Any:
        with self._lock:
            self.updates.append((spec.id, update))
            for key, value in pairs(update):
                self.view[key] = self._merged(key, value)
        return update

    def _merged(self, key: str, value: Any) -> Any:
        """``value`` applied to the view's ``key`` through the graph's own channel (its reducer)."""
        template = self.runner.channels.get(key)
        if template is None:
            return value
        channel = template.from_checkpoint(self.view[key]) if key in self.view else template.copy()
        channel.update([value])
        return channel.get()

    def result(self, outcomes: Mapping[str, TaskOutcome]) -> list[Command[Any]]:
        """Every task's update (one write per key for plain keys, each write for reducers), then the books."""
        per_task: list[Command[Any]] = []
        last: dict[str, Any] = {}
        for _, update in self.updates:
            parts = pairs(update)
            last.update((k, v) for k, v in parts if self._plain(k))
            per_task.append(Command(update=[(k, v) for k, v in parts if not self._plain(k)]))
        return [*per_task, Command(update=list(last.items())), Command(update=self._books(outcomes))]

    def _plain(self, key: str) -> bool:
        """A key without a reducer: LangGraph takes one write per step, so the last one is kept."""
        return isinstance(self.runner.channels.get(key), LastValue)

    def _books(self, outcomes: Mapping[str, TaskOutcome]) -> list[tuple[str, Any]]:
        """The stigmergy-langgraph bookkeeping keys, as deltas for reducer keys and totals for plain ones."""
        completed = [t for t, o in outcomes.items() if o.status is TaskStatus.COMPLETED]
        outputs = {t: output_of(dict(self.updates).get(t)) for t in completed}
        errors = {
            t: o.error or o.status.value for t, o in outcomes.items() if o.status is not TaskStatus.COMPLETED
        }
        pending = [t.id for t in self.runner.tasks if t.id not in self.done and t.id not in completed]
        delta: dict[str, Any] = {
            "completed_tasks": completed,
            "pending_tasks": pending,
            "outputs": outputs,
            "errors": errors,
        }
        books = []
        for key, value in delta.items():
            if key in self.runner.channels:
                grows = key != "pending_tasks" and self._plain(key)
                books.append((key, _extend(self.state.get(key), value) if grows else value))
        return books


def pairs(update: Any) -> list[tuple[str, Any]]:
    """A node's update as (key, value) pairs: a dict, or a Command's update (its goto is not followed)."""
    if isinstance(update, Command):
        update = update.update
    if isinstance(update, Mapping):
        return [(str(k), v) for k, v in update.items()]
    if isinstance(update, list | tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in update):
        return [(str(k), v) for k, v in update]
    if update is None:
        return []
    raise InvalidTaskError(f"a node must return a dict of state updates (or a Command), got {update!r}")


def output_of(update: Any) -> Any:
    """What stigmergy-langgraph records as a task's output: its ``output`` key, else the whole update."""
    return update.get("output", update) if isinstance(update, Mapping) else update


def _extend(previous: Any, delta: Iterable[Any] | Mapping[str, Any]) -> Any:
    if isinstance(delta, Mapping):
        return {**(previous or {}), **delta}
    return [*(previous or []), *delta]
