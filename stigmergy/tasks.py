"""Tasks, dispatch results and run summaries: the scheduler's vocabulary.

``TaskSpec``, ``DispatchResult``, ``SchedulerMetrics`` and ``AgentDispatcher`` keep
the shape of the stigmergy-scheduler package so its code runs unchanged; the
fields after ``metadata`` are new and optional.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from stigmergy.errors import InvalidTaskError
from stigmergy.signal import check_name


@dataclass
class TaskSpec:
    """A task for one agent: runs once its dependencies complete and its pressure crosses the threshold.

    ``max_attempts``, ``timeout`` (seconds per attempt) and ``wake_threshold``
    override the scheduler's (or the agent's) settings for this task.
    """

    id: str
    description: str
    agent_id: str
    priority: float = 0.5
    dependencies: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    max_attempts: int | None = None
    timeout: float | None = None
    wake_threshold: float | None = None


@dataclass
class DispatchResult:
    """What the dispatcher reports for one attempt."""

    success: bool
    output: Any = None
    error: str | None = None


class AgentDispatcher(Protocol):
    """The user's function that runs a task on an agent (typically an LLM call)."""

    async def __call__(self, agent_id: str, task: TaskSpec) -> DispatchResult: ...


class TaskStatus(enum.Enum):
    """Where a task is in its life; the last three are final."""

    WAITING = "waiting"  # on dependencies
    READY = "ready"  # dependencies done; waiting for its pressure to cross the threshold
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # ran out of attempts
    CANCELLED = "cancelled"  # a dependency failed or was cancelled

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """One task at the end of a run: its status, output or last error, and how many attempts it took."""

    task_id: str
    agent_id: str
    status: TaskStatus
    attempts: int
    output: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What :meth:`StigmergyScheduler.run` returns: every task's outcome, by id."""

    outcomes: Mapping[str, TaskOutcome]
    stopped: bool = False  # True when stop() ended the run before every task was final

    def with_status(self, status: TaskStatus) -> dict[str, TaskOutcome]:
        return {k: o for k, o in self.outcomes.items() if o.status is status}

    @property
    def completed(self) -> dict[str, TaskOutcome]:
        return self.with_status(TaskStatus.COMPLETED)

    @property
    def failed(self) -> dict[str, TaskOutcome]:
        return self.with_status(TaskStatus.FAILED)

    @property
    def cancelled(self) -> dict[str, TaskOutcome]:
        return self.with_status(TaskStatus.CANCELLED)

    @property
    def ok(self) -> bool:
        """True when every task completed."""
        return all(o.status is TaskStatus.COMPLETED for o in self.outcomes.values())

    @property
    def outputs(self) -> dict[str, Any]:
        return {k: o.output for k, o in self.completed.items()}

    @property
    def errors(self) -> dict[str, str | None]:
        return {k: o.error for k, o in self.outcomes.items() if o.status is not TaskStatus.COMPLETED}


@dataclass
class SchedulerMetrics:
    """A snapshot of the scheduler (the stigmergy-scheduler fields first, then ours)."""

    total_ticks: int = 0
    total_dispatches: int = 0
    total_completions: int = 0
    total_failures: int = 0
    pending_tasks: int = 0
    completed_tasks: list[str] = field(default_factory=list)
    running_agents: list[str] = field(default_factory=list)
    agent_pressures: dict[str, float] = field(default_factory=dict)
    total_retries: int = 0
    failed_tasks: list[str] = field(default_factory=list)
    cancelled_tasks: list[str] = field(default_factory=list)


def check_task(task: TaskSpec) -> None:
    """Reject a malformed task with an :class:`InvalidTaskError` that names the field."""
    if not isinstance(task, TaskSpec):
        raise InvalidTaskError(f"expected a TaskSpec, got {type(task).__name__}")
    dependencies: Any = task.dependencies  # checked at run time: callers are not always typed
    if isinstance(dependencies, str) or not isinstance(dependencies, list | tuple):
        raise InvalidTaskError(f"task {task.id!r}: dependencies must be a list of ids, got {dependencies!r}")
    try:
        check_name(task.id, "task id")
        check_name(task.agent_id, f"agent_id of task {task.id!r}")
        for dep in task.dependencies:
            check_name(dep, f"dependency of task {task.id!r}")
    except ValueError as exc:
        raise InvalidTaskError(str(exc)) from None
    _check_fraction(task.priority, f"task {task.id!r}: priority")
    if task.wake_threshold is not None:
        _check_fraction(task.wake_threshold, f"task {task.id!r}: wake_threshold")
    if task.max_attempts is not None:
        check_attempts(task.max_attempts, f"task {task.id!r}: max_attempts")
    if task.timeout is not None:
        check_positive(task.timeout, f"task {task.id!r}: timeout")


def check_agent_id(agent_id: Any) -> str:
    """Agent ids follow the field's naming rules (non-empty, printable)."""
    try:
        return str(check_name(agent_id, "agent_id"))
    except ValueError as exc:
        raise InvalidTaskError(str(exc)) from None


def _check_fraction(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise InvalidTaskError(f"{what} must be a number in [0, 1], got {value!r}")


def check_attempts(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidTaskError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


def check_positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidTaskError(f"{what} must be a finite number of seconds > 0, got {value!r}")
    return float(value)
