"""Task lifecycle events: to subscribers as an async iterator, and to a JSON-lines log."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

EventKind = Literal[
    "task_created", "task_started", "task_completed", "task_failed", "task_retried", "task_cancelled"
]


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One step in a task's life.

    ``at`` is the scheduler's clock (what waits are measured on), ``time`` the wall
    clock (epoch seconds). ``pressure`` is the task's pressure when it woke
    (task_started) or None. ``error`` says why on task_failed, task_retried and
    task_cancelled.
    """

    kind: EventKind
    task_id: str
    agent_id: str
    attempt: int
    at: float
    time: float
    pressure: float | None = None
    error: str | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        if data["pressure"] is not None and not math.isfinite(data["pressure"]):
            data["pressure"] = None
        return json.dumps(data, separators=(",", ":"))


class EventBus:
    """Fans events out to every subscriber (unbounded: none is ever dropped) and to a log file."""

    def __init__(self, log_path: str | Path | None = None) -> None:
        self._log_path = Path(log_path) if log_path is not None else None
        self._log: IO[str] | None = None
        self._subscribers: list[MemoryObjectSendStream[TaskEvent]] = []

    def subscribe(self) -> MemoryObjectReceiveStream[TaskEvent]:
        send, receive = anyio.create_memory_object_stream[TaskEvent](max_buffer_size=math.inf)
        self._subscribers.append(send)
        return receive

    def emit(
        self, kind: EventKind, task_id: str, agent_id: str, attempt: int, at: float, **extra: Any
    ) -> None:
        if not self._subscribers and self._log_path is None:
            return
        event = TaskEvent(kind, task_id, agent_id, attempt, at, time.time(), **extra)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(send)  # the subscriber stopped listening
        if self._log_path is not None:
            if self._log is None:
                self._log = self._log_path.open("a", encoding="utf-8", buffering=1)
            self._log.write(event.to_json() + "\n")

    def close(self) -> None:
        """End every subscriber's iteration and close the log (called when a run ends)."""
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
