"""The shared record that lets many scheduler processes run one task set.

A scheduler with a ledger publishes the tasks it is given, claims a task (with a
lease) before each attempt, renews the lease while the attempt runs, and records
the outcome there. Every worker watches the ledger, so a task completed anywhere
frees its dependents everywhere; a lease that runs out (its worker died) lets
another worker take the task over. :class:`~stigmergy.backends.redis_ledger.RedisTaskLedger`
is the implementation; any object with these methods will do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim.

    ``granted``: the task is ours for ``lease`` seconds and this is shared attempt
    number ``attempt``; ``taken_over_from`` names a worker whose lease ran out
    mid-attempt. ``busy``: another worker holds it for ``retry_after`` more seconds.
    ``final``: it already ended (``status`` completed or failed) elsewhere.
    """

    kind: Literal["granted", "busy", "final"]
    attempt: int = 0
    taken_over_from: str | None = None
    retry_after: float = 0.0
    status: str | None = None
    payload: Any = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """Something another worker did: published a task spec, or ended a task."""

    kind: Literal["spec", "completed", "failed"]
    task_id: str
    payload: Any  # the spec as a dict; the output; or the error text


class TaskLedger(Protocol):
    """Shared task state for many schedulers; every call is atomic."""

    async def publish(self, task_id: str, spec: dict[str, Any]) -> bool:
        """Record a spec; False if the same spec is already there; raises DuplicateTaskError if another is."""
        ...

    async def claim(self, task_id: str, worker: str, lease: float) -> Claim: ...

    async def renew(self, task_id: str, worker: str, lease: float) -> bool:
        """Extend our lease; False if it is no longer ours."""
        ...

    async def release(self, task_id: str, worker: str) -> None:
        """Give the task back after a failed attempt that will be retried."""
        ...

    async def finish(self, task_id: str, worker: str, status: str, payload: Any) -> bool:
        """Record the final outcome; False if it had already ended elsewhere."""
        ...

    def watch(self) -> AsyncIterator[LedgerEntry]:
        """Every entry from the beginning of the task set, then each new one as it happens."""
        ...

    async def takeovers(self) -> dict[str, str]:
        """Task id -> the worker whose lease ran out while it held the task."""
        ...
