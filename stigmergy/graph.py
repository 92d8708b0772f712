"""The task graph: dependency bookkeeping and each agent's queue of ready tasks.

Pure, synchronous state (no I/O, no clock reads): the scheduler asks it what is
ready and tells it what happened. Task state is permanent here, never a decaying
signal, so a completed dependency cannot be forgotten.

Each agent's ready tasks sit in a heap ordered by their pressure *without* the
field term: ``priority + pull + aging_rate * (t - ready_since)``. Every ready task
ages at the same rate, so that order never changes with ``t`` and the most
pressed task is always at the top in O(log n), at any queue length.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stigmergy.errors import DependencyCycleError, DuplicateTaskError, UnknownDependencyError
from stigmergy.tasks import TaskOutcome, TaskSpec, TaskStatus

#: Pressure a task gains once it has dependencies and all of them completed:
#: work that unblocks a chain goes before fresh work of the same priority.
DEPENDENCY_PULL = 0.1


@dataclass(slots=True, eq=False)
class TaskRecord:
    """A task and everything the scheduler knows about it."""

    spec: TaskSpec
    status: TaskStatus = TaskStatus.WAITING
    unmet: int = 0  # dependencies not yet completed
    dependents: list[str] = field(default_factory=list)
    attempts: int = 0
    ready_since: float = 0.0
    base: float = 0.0  # priority + pull - aging_rate * ready_since: the heap key
    output: Any = None
    error: str | None = None
    version: int = 0  # bumped whenever the record leaves a heap, so stale entries are skipped

    def outcome(self) -> TaskOutcome:
        spec = self.spec
        return TaskOutcome(spec.id, spec.agent_id, self.status, self.attempts, self.output, self.error)


class TaskGraph:
    """Tasks by id, their dependency edges, and per-agent ready heaps."""

    def __init__(self, aging_rate: float) -> None:
        self.aging_rate = aging_rate
        self.tasks: dict[str, TaskRecord] = {}
        self.missing: dict[str, list[str]] = defaultdict(list)  # unknown dependency -> waiting task ids
        self._ready: dict[str, list[tuple[float, int, int, str]]] = defaultdict(list)
        self._seq = itertools.count()
        self.final_count = 0

    # -- building ---------------------------------------------------------------------

    def add(self, spec: TaskSpec, now: float) -> TaskRecord:
        """Add a validated task; raises on a duplicate id or a dependency cycle."""
        if spec.id in self.tasks:
            raise DuplicateTaskError(f"task {spec.id!r} was already added; give each task a unique id")
        deps = list(dict.fromkeys(spec.dependencies))
        self._check_acyclic(spec.id, deps)
        record = TaskRecord(spec)
        self.tasks[spec.id] = record
        doomed = False
        for dep_id in deps:
            dep = self.tasks.get(dep_id)
            if dep is None:
                self.missing[dep_id].append(spec.id)
                record.unmet += 1
            elif dep.status is TaskStatus.COMPLETED:
                continue
            else:
                doomed = doomed or dep.status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
                dep.dependents.append(spec.id)
                record.unmet += 1
        record.dependents = self.missing.pop(spec.id, [])
        if doomed:
            record.error = "a dependency had already failed or been cancelled"
            self._finish(record, TaskStatus.CANCELLED)
        elif record.unmet == 0:
            self._make_ready(record, now)
        return record

    def _check_acyclic(self, task_id: str, deps: list[str]) -> None:
        if task_id in deps:
            raise DependencyCycleError(f"task {task_id!r} depends on itself")
        if task_id not in self.missing:
            return  # nothing waits on the new task yet, so no path can lead back to it
        path = self._path_to(task_id, deps)
        if path is not None:
            cycle = " -> ".join([task_id, *path])
            raise DependencyCycleError(f"adding task {task_id!r} would close a dependency cycle: {cycle}")

    def _path_to(self, target: str, starts: list[str]) -> list[str] | None:
        """A dependency path from one of ``starts`` to ``target``, if any (iterative DFS)."""
        parent: dict[str, str | None] = {s: None for s in starts}
        stack = list(starts)
        while stack:
            node = stack.pop()
            if node == target:
                path = [node]
                while (prev := parent[path[-1]]) is not None:
                    path.append(prev)
                return path[::-1]
            record = self.tasks.get(node)
            for dep in () if record is None else record.spec.dependencies:
                if dep not in parent:
                    parent[dep] = node
                    stack.append(dep)
        return None

    # -- ready queues -----------------------------------------------------------------

    def _make_ready(self, record: TaskRecord, now: float) -> None:
        record.status = TaskStatus.READY
        record.ready_since = now
        pull = DEPENDENCY_PULL if record.spec.dependencies else 0.0
        record.base = record.spec.priority + pull - self.aging_rate * now
        self.push(record)

    def push(self, record: TaskRecord) -> None:
        """Put a ready task (back) on its agent's heap."""
        record.version += 1
        entry = (-record.base, next(self._seq), record.version, record.spec.id)
        heapq.heappush(self._ready[record.spec.agent_id], entry)

    def top(self, agent_id: str) -> TaskRecord | None:
        """The agent's most pressed ready task (stale heap entries are dropped on the way)."""
        heap = self._ready.get(agent_id)
        while heap:
            _, _, version, task_id = heap[0]
            record = self.tasks[task_id]
            if record.status is TaskStatus.READY and record.version == version:
                return record
            heapq.heappop(heap)
        return None

    def take(self, record: TaskRecord) -> None:
        """Remove ``record`` from its agent's ready queue (its heap entry goes stale)."""
        record.version += 1

    def agents_with_ready(self) -> Iterator[str]:
        return (agent for agent, heap in self._ready.items() if heap)

    def pressure_without_field(self, record: TaskRecord, now: float) -> float:
        return record.base + self.aging_rate * now

    # -- transitions ------------------------------------------------------------------

    def retry(self, record: TaskRecord, now: float) -> None:
        """A failed attempt with attempts left: ready again, aging from now."""
        self._make_ready(record, now)

    def complete(self, record: TaskRecord, output: Any, now: float) -> list[TaskRecord]:
        """Mark done; returns the dependents that became ready."""
        record.output, record.error = output, None
        self._finish(record, TaskStatus.COMPLETED)
        freed = []
        for dep_id in record.dependents:
            dependent = self.tasks[dep_id]
            dependent.unmet -= 1
            if dependent.unmet == 0 and dependent.status is TaskStatus.WAITING:
                self._make_ready(dependent, now)
                freed.append(dependent)
        return freed

    def fail(self, record: TaskRecord, error: str) -> list[TaskRecord]:
        """Fail for good; returns every transitive dependent, now cancelled."""
        record.error = error
        self._finish(record, TaskStatus.FAILED)
        return self.cancel_dependents(record)

    def cancel_dependents(self, record: TaskRecord) -> list[TaskRecord]:
        cancelled = []
        stack = list(record.dependents)
        while stack:
            dependent = self.tasks[stack.pop()]
            if dependent.status.final:
                continue
            dependent.error = f"cancelled: dependency {record.spec.id!r} {record.status.value}"
            self._finish(dependent, TaskStatus.CANCELLED)
            cancelled.append(dependent)
            stack.extend(dependent.dependents)
        return cancelled

    def _finish(self, record: TaskRecord, status: TaskStatus) -> None:
        record.status = status
        record.version += 1
        self.final_count += 1

    def forget(self, task_id: str) -> None:
        """Drop a final task's record (its id is unknown from then on)."""
        record = self.tasks.pop(task_id)
        assert record.status.final
        self.final_count -= 1

    # -- questions --------------------------------------------------------------------

    @property
    def all_final(self) -> bool:
        return self.final_count == len(self.tasks)

    def unresolved(self) -> dict[str, list[str]]:
        """Unknown dependency -> the tasks waiting on it."""
        return {dep: list(waiters) for dep, waiters in self.missing.items()}

    def check_resolved(self) -> None:
        """Raise :class:`UnknownDependencyError` if any task waits on an id no task has."""
        if not self.missing:
            return
        listed = "; ".join(
            f"{dep!r} (needed by {', '.join(map(repr, waiters))})" for dep, waiters in self.missing.items()
        )
        raise UnknownDependencyError(
            f"unknown dependencies: {listed}. Add tasks with these ids, or remove them from `dependencies`"
        )
