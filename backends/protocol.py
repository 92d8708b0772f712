"""The contract between ``PheromoneField`` and a storage backend.

A backend owns the signals and does the arithmetic next to them (numpy arrays in
process, Lua scripts in Redis), so a read never ships the whole field to Python.
Every method is a coroutine and atomic with respect to other calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from stigmergy.decay import DecayPolicy
from stigmergy.signal import Signal


@dataclass(frozen=True, slots=True)
class PressureFloor:
    """A condition of a guarded deposit: every signal of ``signal_type`` at ``region`` (None:
    every region), targeted or not, sums to at least ``at_least`` now."""

    signal_type: str
    region: str | None
    at_least: float


@dataclass(frozen=True, slots=True)
class DepositBatch:
    """Columns of validated deposits, all made at the same instant.

    ``agent_ids``, ``signal_types``, ``target_agent_ids`` and ``regions`` have one entry
    per deposit (target/region entries may be None); ``metadata`` is None or one dict
    per deposit. With ``floors``, the batch is stored only if every floor holds, checked
    in the same atomic step as the deposit; otherwise nothing is stored.
    """

    agent_ids: Sequence[str]
    signal_types: Sequence[str]
    intensities: npt.NDArray[np.float64]
    target_agent_ids: Sequence[str | None]
    regions: Sequence[str | None]
    metadata: Sequence[dict[str, Any]] | None = None
    floors: tuple[PressureFloor, ...] = ()

    def __len__(self) -> int:
        return len(self.intensities)


@dataclass(frozen=True, slots=True)
class PressureQuery:
    """Which signals count toward a reading, and how much each type weighs.

    ``signal_types`` None means every type; ``weights`` maps type -> multiplier
    (missing types weigh 1.0); ``region`` None means every region.
    """

    signal_types: tuple[str, ...] | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    region: str | None = None


@dataclass(frozen=True, slots=True)
class SignalFilter:
    """Selects stored signals: each given criterion must hold.

    ``visible_to`` keeps signals untargeted or targeted at that agent; ``agent_id``
    keeps that depositor's; ``exclude_agent_id`` drops that depositor's.
    """

    visible_to: str | None = None
    agent_id: str | None = None
    exclude_agent_id: str | None = None
    signal_types: tuple[str, ...] | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class StoredSignal:
    """A signal as deposited (``signal.intensity`` is the deposit intensity) and what it is worth now."""

    signal: Signal
    value: float
    evaporates_at: float


@runtime_checkable
class FieldBackend(Protocol):
    """Storage and arithmetic for one field; see ``stigmergy.testing`` for the conformance suite."""

    async def bind(self, policy: DecayPolicy) -> None:
        """Adopt the field's decay policy; called once before any other method."""

    async def now(self) -> float:
        """The field's current time (seconds, monotonic, shared by every user of the field)."""

    async def deposit(
        self,
        agent_id: str,
        signal_type: str,
        intensity: float,
        metadata: dict[str, Any],
        target_agent_id: str | None,
        region: str | None,
    ) -> Signal:
        """Store one signal, already validated by the field (nothing invalid reaches a backend),
        and return it with its id and deposit time."""

    async def deposit_many(self, batch: DepositBatch) -> int:
        """Store many validated signals at once; returns how many were stored (0: a floor failed)."""

    async def pressure(self, agent_id: str | None, query: PressureQuery) -> float:
        """What ``agent_id`` feels now (None: every signal, targeted or not)."""

    async def pressures(self, agent_ids: Sequence[str] | None, query: PressureQuery) -> dict[str, float]:
        """What each agent feels now, in one pass (None: every agent the field knows)."""

    async def signals(self, selector: SignalFilter) -> list[StoredSignal]:
        """The visible signals matching ``selector``."""

    async def get(self, signal_id: str) -> StoredSignal | None:
        """One visible signal by id, or None."""

    async def rescale(
        self,
        factor: float,
        *,
        signal_id: str | None = None,
        region: str | None = None,
        signal_type: str | None = None,
    ) -> list[StoredSignal]:
        """Multiply the deposit intensity of matching visible signals by ``factor``, clamped to [-1, 1].

        Returns the signals whose intensity changed (as now stored).
        """

    async def remove(self, *, agent_id: str | None = None, region: str | None = None) -> int:
        """Delete every signal deposited by ``agent_id`` / at ``region``; returns how many."""

    async def evaporate(self) -> int:
        """Delete the signals whose value fell under the threshold; returns how many."""

    async def count(self) -> int:
        """How many signals are stored (visible or awaiting evaporation)."""

    async def agents(self) -> list[str]:
        """Every agent the field knows (as depositor or target)."""

    async def aclose(self) -> None:
        """Release connections; the backend is unusable afterwards."""
