"""CrewAI on the pressure field: crews dispatched at run time, and LLM calls paced by the gate.

- :class:`StigmergyCrew`: a ``Crew`` whose sequential process is replaced by the
  process's shared scheduler. Every crew task becomes a scheduler task of its agent
  (identified by the agent's id, never by its role); independent tasks run
  concurrently (``akickoff`` runs them on its loop, ``kickoff`` in threads), a
  dependent starts as soon as its last dependency finished, failed attempts are
  retried with back-off, and one agent runs one task at a time (its executor is
  not reentrant). Dependencies are the tasks named in ``context``.
- :class:`StigmergyManager`: the stigmergy-crewai API (``add_task``, ``build_crew``),
  building such a crew.
- :class:`StigmergyLLM`: wraps any CrewAI ``BaseLLM``; each ``call``/``acall`` waits
  in the shared gate, deposits its usage, and turns 429/529/5xx and transport errors
  into holds, retrying once the gate admits it again. CrewAI's ``max_rpm`` (a fixed
  window that sleeps a minute holding a lock) is not needed. CrewAI's own LLM hooks
  are synchronous and cannot wait, hence a wrapper.

Needs the ``crewai`` extra: ``pip install 'stigmergy-field[crewai]'``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from stigmergy.errors import TaskError
from stigmergy.gate import Cost, Route
from stigmergy.integrations.langgraph_pacing import RETRIED, ModelCall, Pacer
from stigmergy.integrations.langgraph_runtime import (
    FieldRuntime,
    TaskBatch,
    extra_required,
    topological_order,
)
from stigmergy.ratelimits import PROVIDERS
from stigmergy.tasks import SchedulerMetrics, TaskOutcome, TaskSpec, TaskStatus

try:
    from crewai import Agent, Crew, Process, Task
    from crewai.crews.utils import prepare_task_execution
    from crewai.llms.base_llm import BaseLLM, call_stop_override
    from crewai.tasks.task_output import TaskOutput
    from pydantic import ConfigDict, Field, PrivateAttr, model_validator
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise extra_required("crewai", exc) from exc

__all__ = ["FieldRuntime", "StigmergyCrew", "StigmergyLLM", "StigmergyManager"]


# -- the LLM wrapper --------------------------------------------------------------------------


class StigmergyLLM(BaseLLM):
    """Any CrewAI LLM, its calls admitted by the shared gate.

    ``route`` names the channel (default: the inner LLM's ``base_url`` or provider,
    and model); ``agent_id`` the caller (default: the id of the agent making the
    call). ``max_retries`` counts retries of 429, 529, 5xx and transport errors.
    ``call`` blocks its thread while it waits (CrewAI runs sync calls in worker
    threads) and refuses to run on a thread that runs an event loop; ``acall`` waits
    without blocking the loop.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm_type: str = "stigmergy"
    inner: BaseLLM
    model: str = ""
    agent_id: str | None = None
    route: Route | None = None
    priority: float = 0.5
    cost: Cost | None = None
    max_retries: int = 8
    runtime: FieldRuntime | None = Field(default=None, exclude=True)
    _pacer: Pacer = PrivateAttr()
    _seen: dict[str, int] = PrivateAttr(default_factory=dict)
    _usage_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _model_of_inner(cls, data: Any) -> Any:
        """``model`` defaults to the inner LLM's (CrewAI requires one)."""
        if isinstance(data, dict) and not data.get("model") and isinstance(data.get("inner"), BaseLLM):
            return {**data, "model": data["inner"].model}
        return data

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        route = self.route or Route(self.inner.base_url or self.inner.provider or "llm", model=self.model)
        provider = self.inner.provider if self.inner.provider in PROVIDERS else None  # their names match ours
        self._pacer = Pacer(
            self.agent_id or "crewai",
            route,
            priority=self.priority,
            cost=self.cost,
            provider=provider,
            runtime=self.runtime,
        )
        self._seen = dict(self.inner._token_usage)

    def call(
        self,
        messages: Any,
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any | None = None,
        from_agent: Any | None = None,
        response_model: Any | None = None,
    ) -> Any:
        """The inner LLM's ``call``, once the gate admits it; retried after holds the upstream asked for."""
        options = _given(tools, callbacks, available_functions, from_task, from_agent, response_model)
        for attempt in range(self.max_retries + 1):
            call = self._pacer.admit(agent_id=self._caller(from_agent))
            try:
                with call_stop_override(self.inner, self.stop_sequences or None):
                    result = self.inner.call(messages, **options)
            except Exception as exc:
                if self._pacer.failed(call, exc).result() not in RETRIED or attempt == self.max_retries:
                    raise
                continue
            self._settle(call)
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def acall(
        self,
        messages: Any,
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any | None = None,
        from_agent: Any | None = None,
        response_model: Any | None = None,
    ) -> Any:
        """The inner LLM's ``acall``, once the gate admits it (the loop never blocks)."""
        options = _given(tools, callbacks, available_functions, from_task, from_agent, response_model)
        for attempt in range(self.max_retries + 1):
            call = await self._pacer.aadmit(agent_id=self._caller(from_agent))
            try:
                with call_stop_override(self.inner, self.stop_sequences or None):
                    result = await self.inner.acall(messages, **options)
            except Exception as exc:
                if await self._pacer.afailed(call, exc) not in RETRIED or attempt == self.max_retries:
                    raise
                continue
            self._settle(call)
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _caller(self, agent: Any) -> str | None:
        return self.agent_id or (str(agent.id) if getattr(agent, "id", None) is not None else None)

    def _settle(self, call: ModelCall) -> None:
        """Deposit the tokens the inner LLM counted since the last settlement.

        Its counters are per instance and cumulative, so with calls overlapping each
        settlement takes what accrued since the previous one: the total is exact.
        """
        with self._usage_lock:
            now = dict(self.inner._token_usage)
            inputs = now.get("prompt_tokens", 0) - self._seen.get("prompt_tokens", 0)
            outputs = now.get("completion_tokens", 0) - self._seen.get("completion_tokens", 0)
            self._seen = now
        self._track_token_usage_internal(
            {"prompt_tokens": inputs, "completion_tokens": outputs, "total_tokens": inputs + outputs}
        )
        counted = inputs + outputs > 0
        self._pacer.succeeded(
            call, input_tokens=inputs if counted else None, output_tokens=outputs if counted else None
        )

    def supports_function_calling(self) -> bool:
        supports = getattr(self.inner, "supports_function_calling", None)
        return bool(supports()) if callable(supports) else False

    def supports_stop_words(self) -> bool:
        return self.inner.supports_stop_words()

    def get_context_window_size(self) -> int:
        return self.inner.get_context_window_size()

    def supports_multimodal(self) -> bool:
        return self.inner.supports_multimodal()


def _given(
    tools: Any, callbacks: Any, available_functions: Any, from_task: Any, from_agent: Any, response_model: Any
) -> dict[str, Any]:
    """The call's options that were given, by name: custom LLMs often declare only some of them."""
    options = {
        "tools": tools,
        "callbacks": callbacks,
        "available_functions": available_functions,
        "from_task": from_task,
        "from_agent": from_agent,
        "response_model": response_model,
    }
    return {name: value for name, value in options.items() if value is not None}


# -- the crew ---------------------------------------------------------------------------------


class StigmergyCrew(Crew):
    """A crew whose tasks are dispatched at run time by the shared scheduler (see the module doc).

    ``kickoff`` blocks its thread (refused on a thread that runs an event loop; use
    ``akickoff`` there). A task that fails for good raises a
    :class:`~stigmergy.errors.TaskError` naming every unfinished task and why,
    after the others have finished. Hierarchical crews run as CrewAI runs them.
    """

    _specs: dict[str, TaskSpec] = PrivateAttr(default_factory=dict)  # by CrewAI task id
    _runtime: FieldRuntime | None = PrivateAttr(default=None)
    _concurrency: dict[str, int | None] = PrivateAttr(default_factory=dict)

    def schedule(
        self,
        specs: Mapping[str, TaskSpec] | None = None,
        *,
        runtime: FieldRuntime | None = None,
        concurrency: Mapping[str, int | None] | None = None,
    ) -> StigmergyCrew:
        """Set scheduling details by CrewAI task id (ids, priorities, retries); returns the crew."""
        self._specs = dict(specs or {})
        self._runtime = runtime
        self._concurrency = dict(concurrency or {})
        return self

    def _run_sequential_process(self) -> Any:
        plan = _CrewPlan(self)
        return plan.result(self._batch(plan, plan.execute).run())

    async def _arun_sequential_process(self) -> Any:
        plan = _CrewPlan(self)
        return plan.result(await self._batch(plan, plan.aexecute).arun())

    def _batch(self, plan: _CrewPlan, attempt: Callable[[TaskSpec], Any]) -> TaskBatch:
        agents = {spec.agent_id: self._concurrency.get(spec.agent_id) for spec in plan.specs}
        return TaskBatch(plan.specs, attempt, runtime=self._runtime, agents=agents)

    def spec_for(self, task: Task) -> TaskSpec:
        """The scheduler task for a crew task: as scheduled, else its id, its agent's id, its context."""
        spec = self._specs.get(str(task.id))
        if spec is not None:
            return spec
        agent = task.agent
        if agent is None:
            raise ValueError(f"task {task.description!r} has no agent")
        context = task.context if isinstance(task.context, list) else []
        return TaskSpec(
            str(task.id), task.description, str(agent.id), dependencies=[str(t.id) for t in context]
        )


class _CrewPlan:
    """One kickoff: the crew's tasks by scheduler id, and how to run one."""

    def __init__(self, crew: StigmergyCrew) -> None:
        self.crew = crew
        self.specs = [crew.spec_for(task) for task in crew.tasks]
        self.tasks = {spec.id: task for spec, task in zip(self.specs, crew.tasks, strict=True)}
        self.index = {spec.id: i for i, spec in enumerate(self.specs)}

    def _prepare(self, spec: TaskSpec) -> tuple[Task, Any, Any]:
        task = self.tasks[spec.id]
        data, _, _ = prepare_task_execution(self.crew, task, self.index[spec.id], None, [], None)
        return task, data, self.crew._get_context(task, [])

    def execute(self, spec: TaskSpec) -> TaskOutput:
        task, data, context = self._prepare(spec)
        return self._record(spec, task.execute_sync(agent=data.agent, context=context, tools=data.tools))

    async def aexecute(self, spec: TaskSpec) -> TaskOutput:
        task, data, context = self._prepare(spec)
        return self._record(
            spec, await task.aexecute_sync(agent=data.agent, context=context, tools=data.tools)
        )

    def _record(self, spec: TaskSpec, output: TaskOutput) -> TaskOutput:
        task = self.tasks[spec.id]
        self.crew._process_task_result(task, output)
        self.crew._store_execution_log(task, output, self.index[spec.id], False)
        return output

    def result(self, outcomes: Mapping[str, TaskOutcome]) -> Any:
        """The crew's output (task outputs in crew order), or a TaskError if any task did not finish."""
        unfinished = {
            t: o.error or o.status.value for t, o in outcomes.items() if o.status is not TaskStatus.COMPLETED
        }
        if unfinished:
            details = "; ".join(f"{t}: {why}" for t, why in unfinished.items())
            raise TaskError(f"{len(unfinished)} crew task(s) did not finish: {details}")
        return self.crew._create_crew_output([outcomes[s.id].output for s in self.specs])


# -- the stigmergy-crewai API -------------------------------------------------------------------


class StigmergyManager:
    """Declare crew tasks with priorities and dependencies; build a crew that schedules them at run time.

    ``wake_threshold`` applies to this manager's tasks. ``decay_half_life`` and
    ``evaporation_threshold`` are accepted for stigmergy-crewai compatibility; the
    shared field's own settings apply. ``max_attempts`` and ``timeout`` (seconds per
    attempt) default to the scheduler's (3 attempts, no timeout).
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
    ) -> None:
        self.wake_threshold = wake_threshold
        self.decay_half_life = decay_half_life
        self.evaporation_threshold = evaporation_threshold
        self.runtime = runtime
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._tasks: dict[str, Task] = {}
        self._specs: dict[str, TaskSpec] = {}
        self._agents: dict[int, Agent] = {}

    def add_task(
        self,
        task_id: str,
        agent: Agent,
        description: str,
        expected_output: str = "",
        priority: float = 0.5,
        deps: list[str] | None = None,
        *,
        agent_id: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> Task:
        """Add a task for ``agent`` (known by ``agent_id``, default its id); ``deps`` name earlier tasks."""
        deps = list(deps or [])
        unknown = [d for d in deps if d not in self._tasks]
        if unknown:
            raise ValueError(f"task {task_id!r} depends on tasks not added before it: {', '.join(unknown)}")
        task = Task(
            description=description,
            expected_output=expected_output or f"Completed: {description}",
            agent=agent,
            context=[self._tasks[d] for d in deps] or None,
        )
        self._tasks[task_id] = task
        self._agents[id(agent)] = agent
        self._specs[str(task.id)] = TaskSpec(
            id=task_id,
            description=description,
            agent_id=agent_id or str(agent.id),
            priority=priority,
            dependencies=deps,
            max_attempts=max_attempts if max_attempts is not None else self.max_attempts,
            timeout=timeout if timeout is not None else self.timeout,
            wake_threshold=self.wake_threshold,
        )
        return task

    def build_crew(self, verbose: bool = False, **crew_kwargs: Any) -> StigmergyCrew:
        """A crew of every added task; ``kickoff``/``akickoff`` dispatch them at run time."""
        crew = StigmergyCrew(
            agents=list(self._agents.values()),
            tasks=list(self._tasks.values()),
            process=Process.sequential,
            verbose=verbose,
            **crew_kwargs,
        )
        return crew.schedule(self._specs, runtime=self.runtime)

    @property
    def task_order(self) -> list[str]:
        """A preview of one order the tasks may start in: dependencies first, then by priority."""
        specs = sorted(self._specs.values(), key=lambda s: -s.priority)
        return [s.id for s in topological_order(specs)]

    @property
    def metrics(self) -> SchedulerMetrics:
        """The shared scheduler's counters."""
        return (self.runtime or FieldRuntime.default()).scheduler.get_metrics()
