"""The process's field runtime: one field, gate and scheduler on a loop of their own.

Framework code reaches models and tasks from everywhere: coroutines on the
application's loop, sync nodes in worker threads, sync kickoffs with no loop at
all. The gate and the scheduler keep their state on one event loop (their events
belong to it), so :class:`FieldRuntime` runs them on a loop in a daemon thread and
lets any caller in: coroutines await a future (their own loop never blocks),
sync code blocks its own thread, and is refused on a thread that runs an event
loop, which the wait would freeze. :meth:`FieldRuntime.default` is the one runtime
of the process, so every graph, crew and model call shares one field, one gate and
one scheduler, and per-agent concurrency holds across all of them.

Work runs back where it came from: a :class:`TaskBatch` (one graph invocation, one
crew kickoff) adds its tasks to the shared scheduler under ids of its own, and each
attempt the scheduler starts is executed in the batch's context (the framework's
context variables), a coroutine on the batch's loop, a sync function in a thread.

Framework-neutral: the LangGraph and CrewAI adapters both build on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread

from stigmergy.errors import DependencyCycleError, DuplicateTaskError, UnknownDependencyError
from stigmergy.events import TaskEvent
from stigmergy.gate import Gate
from stigmergy.scheduler import StigmergyScheduler
from stigmergy.tasks import DispatchResult, TaskOutcome, TaskSpec, TaskStatus

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Events that end a task, and the status each one leaves it in.
FINAL_EVENTS = {
    "task_completed": TaskStatus.COMPLETED,
    "task_failed": TaskStatus.FAILED,
    "task_cancelled": TaskStatus.CANCELLED,
}

BLOCKING_REFUSED = (
    "a synchronous wait for the field was called on a thread that runs an event loop; it would "
    "freeze that loop. Use the async API there (ainvoke / aacquire / acall / akickoff)."
)

#: ``attempt(task)``: runs one attempt of a task (the caller's own TaskSpec) and returns its output.
Attempt = Callable[[TaskSpec], Any]


def extra_required(extra: str, exc: ImportError) -> ImportError:
    """The ImportError for a missing framework: it names the pip extra that installs it."""
    return ImportError(
        f"stigmergy.integrations.{extra} needs the {extra} extra: "
        f"pip install 'stigmergy-field[{extra}]' ({exc})"
    )


def on_loop_thread() -> bool:
    """True when the calling thread is running an event loop (a blocking wait would freeze it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class FieldRuntime:
    """One field, gate and scheduler, driven from a daemon thread's event loop.

    ``gate`` (default: a new :class:`~stigmergy.gate.Gate`) brings the field; the
    ``scheduler`` (default: a new one on that field) gets this runtime as its
    dispatcher. ``max_threads`` caps the threads that run sync attempts at once.
    Pass a gate or scheduler only to this runtime: they are driven from its thread.
    """

    _default: ClassVar[FieldRuntime | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        *,
        gate: Gate | None = None,
        scheduler: StigmergyScheduler | None = None,
        max_threads: int = 64,
    ) -> None:
        self.gate = gate if gate is not None else Gate()
        self.field = self.gate.field
        self.scheduler = scheduler if scheduler is not None else StigmergyScheduler(field=self.field)
        self.scheduler.set_dispatcher(self._dispatch)
        self._max_threads = max_threads
        self._threads: anyio.CapacityLimiter | None = None
        self._batches: dict[str, TaskBatch] = {}
        self._owners: dict[str, TaskBatch] = {}  # scheduler task id -> its batch
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._main: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @classmethod
    def default(cls) -> FieldRuntime:
        """The process's runtime, made on first use: one field, gate and scheduler for every adapter."""
        with cls._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default

    # -- reaching the loop ------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (started on first use)."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._loop, ready), name="stigmergy-field", daemon=True
                )
                self._thread.start()
                ready.wait()
            return self._loop

    def _serve(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self._wake = asyncio.Event()
        self._threads = anyio.CapacityLimiter(self._max_threads)
        self._main = loop.create_task(self._supervise())
        loop.call_soon(ready.set)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(self._main)
        loop.close()

    def close(self) -> None:
        """Stop the loop and its thread: running attempts are cancelled, runs still waiting fail."""
        with self._lock:
            loop, main, thread = self._loop, self._main, self._thread
            self._loop = self._main = self._thread = None
        if loop is None or main is None or thread is None:
            return
        loop.call_soon_threadsafe(main.cancel)
        thread.join()

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Start ``fn(*args)`` on the runtime's loop; returns at once."""
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the runtime's loop and block this thread for the result.

        Refused (RuntimeError) on a thread that runs an event loop: it would freeze it.
        """
        if on_loop_thread():
            raise RuntimeError(BLOCKING_REFUSED)
        return self.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` run on the runtime's loop; cancelling this cancels it there."""
        if asyncio.get_running_loop() is self._loop:
            return await fn(*args)
        return await asyncio.wrap_future(self.submit(fn, *args))

    # -- the scheduler ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Run the scheduler whenever some batch has tasks; sleep otherwise."""
        assert self._wake is not None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._batches:
                    await self._run_scheduler()
        finally:
            for batch in list(self._batches.values()):
                self._end(batch, RuntimeError("the field runtime was closed"))

    async def _run_scheduler(self) -> None:
        events = self.scheduler.events()
        async with anyio.create_task_group() as group:
            group.start_soon(self._route, events)
            try:
                summary = await self.scheduler.run()
            except Exception as exc:
                logger.exception("the shared scheduler stopped")
                for batch in list(self._batches.values()):
                    self._end(batch, exc)
                return
        for task_id, outcome in summary.outcomes.items():  # what the events did not settle
            if outcome.status.final and (owner := self._owners.get(task_id)) is not None:
                self._settle(owner, task_id, outcome.status, outcome.attempts, outcome.error)

    async def _route(self, events: AsyncIterator[TaskEvent]) -> None:
        """Settle each batch's tasks as they end, so a batch returns as soon as its own tasks are done."""
        async for event in events:
            status = FINAL_EVENTS.get(event.kind)
            batch = self._owners.get(event.task_id)
            if status is not None and batch is not None:
                self._settle(batch, event.task_id, status, event.attempt, event.error)

    def _settle(
        self, batch: TaskBatch, task_id: str, status: TaskStatus, attempts: int, error: str | None
    ) -> None:
        del self._owners[task_id]
        if batch.settle(task_id, status, attempts, error):
            self._end(batch, None)

    def _end(self, batch: TaskBatch, error: BaseException | None) -> None:
        self._batches.pop(batch.id, None)
        for task_id in batch.scheduler_ids:
            self._owners.pop(task_id, None)
        self.scheduler.forget(batch.scheduler_ids)  # one scheduler serves every run: keep only live ones
        batch.finish(error)

    async def add_batch(self, batch: TaskBatch, agents: Mapping[str, int | None]) -> None:
        """Register a batch's agents and tasks, then wake the scheduler (called by :class:`TaskBatch`)."""
        assert self._wake is not None
        for agent_id, concurrency in agents.items():
            self.scheduler.register_agent(agent_id, concurrency=concurrency)
        self._batches[batch.id] = batch
        for spec in batch.specs:
            self._owners[spec.id] = batch
            await self.scheduler.add_task(spec)
        self._wake.set()

    async def _dispatch(self, agent_id: str, task: TaskSpec) -> DispatchResult:
        batch = self._owners.get(task.id)
        if batch is None:
            return DispatchResult(False, error=f"no run owns task {task.id!r}")
        assert self._threads is not None
        return DispatchResult(True, output=await batch.execute(task, self._threads))


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


def check_plan(tasks: Sequence[TaskSpec], done: Collection[str] = ()) -> None:
    """Refuse a task set the shared scheduler could not finish: duplicate ids, unknown deps, cycles.

    Checked before anything is added, so a bad plan leaves nothing behind in the
    scheduler. ``done`` names tasks finished earlier, which dependencies may name.
    """
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise DuplicateTaskError(f"task ids must be unique: {', '.join(duplicates)}")
    known = set(ids) | set(done)
    for task in tasks:
        missing = [d for d in task.dependencies if d not in known]
        if missing:
            raise UnknownDependencyError(f"task {task.id!r} depends on unknown tasks: {', '.join(missing)}")
    order = topological_order(tasks, done)
    if len(order) != len(tasks):
        stuck = sorted(set(ids) - {t.id for t in order})
        raise DependencyCycleError(f"dependency cycle among tasks: {', '.join(stuck)}")


def topological_order(tasks: Iterable[TaskSpec], done: Collection[str] = ()) -> list[TaskSpec]:
    """Tasks with every dependency before them (those on a cycle are left out)."""
    pending = {t.id: t for t in tasks}
    placed = set(done)
    order: list[TaskSpec] = []
    progress = True
    while pending and progress:
        ready = [t for t in pending.values() if all(d in placed for d in t.dependencies)]
        progress = bool(ready)
        for task in ready:
            order.append(pending.pop(task.id))
            placed.add(task.id)
    return order


class TaskBatch:
    """One run's tasks in the shared scheduler (a graph invocation, a crew kickoff).

    ``attempt(task)`` runs one attempt of one of ``tasks`` and returns its output
    (raising fails the attempt; the scheduler retries with back-off). A coroutine
    function is run on the loop that made the batch, a plain function in a thread;
    both in a copy of the context the batch was made in. Dependencies may also name
    ``done`` tasks (finished earlier, so not run again). ``agents`` gives the
    per-agent concurrency to register (None keeps the scheduler's).

    Built and run by the caller: :meth:`run` (blocking a thread without an event loop)
    or :meth:`arun`; both return every task's :class:`~stigmergy.tasks.TaskOutcome`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        attempt: Attempt,
        *,
        runtime: FieldRuntime | None = None,
        done: Collection[str] = (),
        agents: Mapping[str, int | None] | None = None,
    ) -> None:
        check_plan(tasks, done)
        self.runtime = runtime if runtime is not None else FieldRuntime.default()
        self.id = uuid.uuid4().hex[:12]
        ordered = topological_order(tasks, done)  # dependencies are added before their dependents
        self.specs = [self._scoped(t, done) for t in ordered]
        self.scheduler_ids = [s.id for s in self.specs]
        self._local = {s.id: t for s, t in zip(self.specs, ordered, strict=True)}
        self._attempt = attempt
        self._async = inspect.iscoroutinefunction(attempt)
        self._agents = dict(agents or {})
        self._context = contextvars.copy_context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: dict[str, Any] = {}
        self._remaining = set(self.scheduler_ids)
        self.outcomes: dict[str, TaskOutcome] = {}
        self._done: concurrent.futures.Future[dict[str, TaskOutcome]] = concurrent.futures.Future()

    def _scoped(self, task: TaskSpec, done: Collection[str]) -> TaskSpec:
        """The task under this batch's ids (so runs never collide), without finished dependencies."""
        deps = [f"{d}@{self.id}" for d in task.dependencies if d not in done]
        return dataclasses.replace(task, id=f"{task.id}@{self.id}", dependencies=deps)

    def run(self) -> dict[str, TaskOutcome]:
        """Run every task; block this thread (one without an event loop) until all are final."""
        if self._async:
            raise RuntimeError("a coroutine attempt needs arun() on its event loop")
        if self.specs:
            self.runtime.call(self.runtime.add_batch, self, self._agents)
        return self._done.result() if self.specs else {}

    async def arun(self) -> dict[str, TaskOutcome]:
        """Run every task; wait without blocking the loop until all are final."""
        self._loop = asyncio.get_running_loop()
        if not self.specs:
            return {}
        await self.runtime.acall(self.runtime.add_batch, self, self._agents)
        return await asyncio.wrap_future(self._done)

    # -- called on the runtime's loop ---------------------------------------------------------

    async def execute(self, task: TaskSpec, threads: anyio.CapacityLimiter) -> Any:
        """One attempt, run where the batch's work belongs; its output is kept for the outcome."""
        if self._done.done():
            raise RuntimeError("the run that owns this task is over (it was cancelled)")
        local = self._local[task.id]
        if self._async:
            output = await self._on_own_loop(local)
        else:
            context = self._context.copy()
            output = await anyio.to_thread.run_sync(
                context.run, self._attempt, local, abandon_on_cancel=True, limiter=threads
            )
        self._outputs[task.id] = output
        return output

    async def _on_own_loop(self, task: TaskSpec) -> Any:
        """Run the coroutine attempt on the batch's loop, in its context; cancelling here cancels it there."""
        loop = self._loop
        assert loop is not None
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def start() -> None:
            running = loop.create_task(self._attempt(task), context=self._context.copy())
            running.add_done_callback(lambda done: _copy_outcome(done, result))
            result.add_done_callback(lambda f: f.cancelled() and loop.call_soon_threadsafe(running.cancel))

        loop.call_soon_threadsafe(start)
        return await asyncio.wrap_future(result)

    def settle(self, task_id: str, status: TaskStatus, attempts: int, error: str | None) -> bool:
        """Record a task's end; True once every task of the batch has ended."""
        local = self._local[task_id]
        output = self._outputs.pop(task_id, None)
        self.outcomes[local.id] = TaskOutcome(local.id, local.agent_id, status, attempts, output, error)
        self._remaining.discard(task_id)
        return not self._remaining

    def finish(self, error: BaseException | None) -> None:
        if self._done.done():
            return  # the caller stopped waiting
        if error is None:
            self._done.set_result(self.outcomes)
        else:
            self._done.set_exception(error)


def _copy_outcome(source: asyncio.Task[Any], target: concurrent.futures.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())
