"""PheromoneField: agents deposit decaying signals and feel the pressure they add up to.

The pressure agent ``a`` feels at time ``t`` is

    P_a(t) = sum over visible signals s of  w(type_s) * I_s * f_s(t - t_s)

where visible means untargeted or targeted at ``a``, not deposited by ``a``, in the
region and of the types asked for, and still worth at least the evaporation
threshold. ``f`` is the signal type's decay strategy, a closed-form function of
age, so readings never depend on how often :meth:`PheromoneField.decay` runs.

The API is that of the stigmergy-scheduler package (its code runs unchanged),
plus batch deposits, many agents' pressure in one call, and :meth:`explain`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.backends.protocol import (
    DepositBatch,
    FieldBackend,
    PressureFloor,
    PressureQuery,
    SignalFilter,
    StoredSignal,
)
from stigmergy.decay import DecayPolicy, DecayStrategy, StepDecay
from stigmergy.errors import InvalidSignalError
from stigmergy.signal import Signal, check_intensity, check_metadata, check_name

#: Intensity under which a signal is gone (the stigmergy-scheduler default).
EVAPORATION_THRESHOLD = 0.01
#: The most one reinforce/amplify call may multiply an intensity by.
MAX_AMPLIFICATION = 3.0
#: Types that persist for a run (step decay) unless configured otherwise.
PERSISTENT_SIGNAL_TYPES = frozenset({"task_complete"})
PERSISTENT_TTL_SECONDS = 3600.0
#: Unweighted pressure queries kept built, by (types, region); cleared when this many.
QUERY_CACHE = 4096
#: Intensity lists up to this long are checked in Python, not numpy (see _short_column).
SHORT_COLUMN = 16

#: Told which regions a change touched (None: any); see :meth:`PheromoneField.on_change`.
ChangeListener = Callable[[frozenset[str] | None], None]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One signal's share of a reading."""

    signal_id: str
    agent_id: str
    signal_type: str
    deposited_intensity: float
    value: float
    weight: float
    contribution: float
    deposited_at: float
    evaporates_at: float
    target_agent_id: str | None
    region: str | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why an agent feels what it feels: the reading and every signal behind it."""

    agent_id: str | None
    pressure: float
    at: float
    contributions: tuple[Contribution, ...]

    def __str__(self) -> str:
        who = "the whole field" if self.agent_id is None else f"agent {self.agent_id!r}"
        lines = [f"pressure on {who} at t={self.at:.3f}: {self.pressure:+.4f}"]
        for c in self.contributions:
            until = "never" if math.isinf(c.evaporates_at) else f"in {c.evaporates_at - self.at:.1f}s"
            lines.append(
                f"  {c.contribution:+.4f}  {c.signal_type} from {c.agent_id}"
                f" (deposited {c.deposited_intensity:+.3f}, now {c.value:+.4f}, weight {c.weight:g};"
                f" evaporates {until})"
            )
        return "\n".join(lines)


def _factor(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise InvalidSignalError(f"factor must be a finite number >= 0, got {value!r}")
    return float(value)


def _types(signal_types: Sequence[str] | None) -> tuple[str, ...] | None:
    if signal_types is None:
        return None
    if isinstance(signal_types, str):  # a lone string is a common slip for [string]
        return (signal_types,)
    return tuple(signal_types)


def _weights(weights: Mapping[str, float] | None) -> Mapping[str, float]:
    for name, weight in (weights or {}).items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise InvalidSignalError(f"weight for {name!r} must be a finite number, got {weight!r}")
    return weights or {}


def _short_column(intensities: object) -> np.ndarray[Any, Any] | None:
    """A short list of plain numbers, checked one by one (None: anything else, for numpy to check).

    The gate deposits two or three spends a request: numpy's per-call costs are most of
    the checking there, and nothing of it pays off below a few dozen values.
    """
    if type(intensities) is not list or len(intensities) > SHORT_COLUMN:
        return None
    if not all(type(value) in (float, int, bool) for value in intensities):
        return None  # numpy scalars, strings...: numpy's checks and messages
    for at, value in enumerate(intensities):
        check_intensity(value, f"intensities[{at}]")
    return np.array(intensities, dtype=np.float64)


def _column(value: Any, n: int, what: str) -> list[Any]:
    """Broadcast a scalar (or None) to ``n`` entries; check a sequence's length."""
    if value is None or isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise InvalidSignalError(f"{what} has {len(values)} entries, other columns {n}")
    return values


class PheromoneField:
    """A shared field of decaying signals.

    ``backend`` stores the signals (default: in memory). ``decay_strategy`` decays
    every type not named in ``decay_by_type``; ``task_complete`` persists for
    ``persistent_ttl`` seconds unless given a strategy. Signals worth less than
    ``evaporation_threshold`` no longer count and are removed by :meth:`decay`.
    """

    def __init__(
        self,
        backend: FieldBackend | None = None,
        decay_strategy: DecayStrategy | Any | None = None,
        evaporation_threshold: float = EVAPORATION_THRESHOLD,
        max_amplification: float = MAX_AMPLIFICATION,
        persistent_ttl: float = PERSISTENT_TTL_SECONDS,
        *,
        decay_by_type: Mapping[str, DecayStrategy | Any] | None = None,
    ) -> None:
        by_type: dict[str, Any] = {name: StepDecay(persistent_ttl) for name in PERSISTENT_SIGNAL_TYPES}
        by_type.update(decay_by_type or {})
        self.policy = DecayPolicy(decay_strategy, by_type, evaporation_threshold)
        self._max_amplification = _factor(max_amplification)
        self._backend: FieldBackend = backend if backend is not None else InMemoryFieldBackend()
        self._bound = False
        self._listeners: list[ChangeListener] = []
        self._queries: dict[tuple[tuple[str, ...], str | None], PressureQuery] = {}

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(regions)`` after every change made through this object.

        ``regions`` holds the regions the change touched (empty: only region-less
        signals), or is None when any region may have changed. This is how a
        scheduler in the same process wakes at once on a deposit; changes made by
        other processes on a shared field are seen at the next read instead.
        """
        self._listeners.append(listener)

    def _changed(self, regions: frozenset[str] | None) -> None:
        for listener in self._listeners:
            listener(regions)

    @property
    def backend(self) -> FieldBackend:
        return self._backend

    async def _ready(self) -> FieldBackend:
        if not self._bound:
            await self._backend.bind(self.policy)
            self._bound = True
        return self._backend

    async def now(self) -> float:
        """The field's clock (seconds): what ``deposited_at`` and ``evaporates_at`` are measured on."""
        return await (await self._ready()).now()

    # -- writing ---------------------------------------------------------------------

    async def deposit(
        self,
        agent_id: str,
        signal_type: str,
        intensity: float = 1.0,
        metadata: dict[str, Any] | None = None,
        target_agent_id: str | None = None,
        region: str | None = None,
    ) -> Signal:
        """Deposit one signal; raises :class:`InvalidSignalError` for bad input (never clamps)."""
        backend = self._backend if self._bound else await self._ready()
        signal = await backend.deposit(
            check_name(agent_id, "agent_id"),  # type: ignore[arg-type]
            check_name(signal_type, "signal_type"),  # type: ignore[arg-type]
            check_intensity(intensity),
            check_metadata(metadata),
            check_name(target_agent_id, "target_agent_id", optional=True),
            check_name(region, "region", optional=True),
        )
        if self._listeners:
            self._changed(frozenset() if region is None else frozenset((region,)))
        return signal

    async def deposit_many(
        self,
        agent_ids: str | Sequence[str],
        signal_types: str | Sequence[str],
        intensities: float | Sequence[float] | np.ndarray[Any, Any],
        *,
        target_agent_ids: str | Sequence[str | None] | None = None,
        regions: str | Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        floors: Sequence[PressureFloor] = (),
    ) -> int:
        """Deposit many signals at one instant, columns at a time; returns how many.

        Any column may be a single value that applies to every deposit. The whole
        batch is validated before anything is stored: all or nothing. With ``floors``
        the batch is stored only if each holds, checked in the same atomic step (on a
        shared backend too); 0 means one did not and nothing was stored. That is how
        processes sharing a field take a share of a window without overshooting it.
        """
        sequences = [
            c
            for c in (agent_ids, signal_types, target_agent_ids, regions, metadata)
            if c is not None and not isinstance(c, str)
        ]
        values = _short_column(intensities)
        if values is None:
            values = np.asarray(intensities)
            if values.dtype.kind not in "fiu" or values.ndim > 1:
                raise InvalidSignalError("intensities must be a number or a 1-D sequence of numbers")
            if values.ndim == 0:
                values = np.full(len(sequences[0]) if sequences else 1, values)
            values = values.astype(np.float64)
            bad = ~(np.isfinite(values) & (np.abs(values) <= 1.0))
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                raise InvalidSignalError(
                    f"intensities[{at}] must be a finite number in [-1, 1], got {values[at]!r}"
                )
        n = len(values)
        agents = _column(agent_ids, n, "agent_ids")
        types = _column(signal_types, n, "signal_types")
        targets = _column(target_agent_ids, n, "target_agent_ids")
        places = _column(regions, n, "regions")
        for column, what, optional in (
            (agents, "agent_id", False),
            (types, "signal_type", False),
            (targets, "target_agent_id", True),
            (places, "region", True),
        ):
            for name in set(column):
                check_name(name, what, optional=optional)
        metas = None if metadata is None else [check_metadata(m) for m in _column(metadata, n, "metadata")]
        for floor in floors:
            check_name(floor.signal_type, "a floor's signal_type", optional=False)
            check_name(floor.region, "a floor's region", optional=True)
            if not math.isfinite(floor.at_least):
                raise InvalidSignalError(
                    f"a floor's at_least must be a finite number, got {floor.at_least!r}"
                )
        batch = DepositBatch(agents, types, values, targets, places, metas, tuple(floors))
        count = await (await self._ready()).deposit_many(batch)
        if count and self._listeners:
            self._changed(frozenset(p for p in places if p is not None))
        return count

    async def inhibit(
        self,
        region: str | None,
        agent_id: str = "system",
        intensity: float = -0.4,
        metadata: dict[str, Any] | None = None,
        target_agent_id: str | None = None,
    ) -> Signal:
        """Deposit repulsion (an ``inhibition`` signal): backoff that fades as it decays."""
        if isinstance(intensity, int | float) and not isinstance(intensity, bool) and intensity > 0:
            raise InvalidSignalError(
                f"inhibit deposits repulsion: pass a negative intensity, got {intensity!r}"
            )
        return await self.deposit(agent_id, "inhibition", intensity, metadata, target_agent_id, region)

    async def amplify(self, signal_id: str, factor: float) -> Signal | None:
        """Multiply one signal's deposit intensity (capped at ``max_amplification`` x, and at +/-1).

        Returns the updated signal with its current value, or None if it is gone.
        """
        factor = min(_factor(factor), self._max_amplification)
        backend = await self._ready()
        changed = await backend.rescale(factor, signal_id=signal_id)
        if changed:
            region = changed[0].signal.region
            self._changed(frozenset() if region is None else frozenset((region,)))
            return self._current(changed[0])
        stored = await backend.get(signal_id)
        return None if stored is None else self._current(stored)

    async def reinforce(self, region: str, signal_type: str | None = None, factor: float = 1.5) -> int:
        """Positive feedback: amplify every signal at ``region`` (of one type); returns how many changed."""
        factor = min(_factor(factor), self._max_amplification)
        changed = await (await self._ready()).rescale(factor, region=region, signal_type=signal_type)
        self._changed(frozenset((region,)))
        return len(changed)

    async def decay(self) -> int:
        """Remove signals that fell under the evaporation threshold; returns how many.

        Only frees memory: readings already ignore evaporated signals.
        """
        return await (await self._ready()).evaporate()

    async def clear_agent(self, agent_id: str) -> int:
        """Remove every signal ``agent_id`` deposited; returns how many."""
        removed = await (await self._ready()).remove(agent_id=agent_id)
        self._changed(None)
        return removed

    async def clear_region(self, region: str) -> int:
        """Remove every signal at ``region``; returns how many."""
        removed = await (await self._ready()).remove(region=region)
        self._changed(frozenset((region,)))
        return removed

    # -- reading ---------------------------------------------------------------------

    async def read(
        self,
        agent_id: str | None = None,
        signal_types: Sequence[str] | None = None,
        exclude_own: bool = False,
        min_intensity: float | None = None,
        region: str | None = None,
    ) -> list[Signal]:
        """Visible signals, strongest first, each with its current (decayed) intensity.

        With ``agent_id``: only signals untargeted or targeted at it (and, with
        ``exclude_own``, not its own).
        """
        selector = SignalFilter(
            visible_to=agent_id,
            exclude_agent_id=agent_id if exclude_own else None,
            signal_types=_types(signal_types),
            region=region,
        )
        stored = await (await self._ready()).signals(selector)
        signals = [self._current(s) for s in stored]
        if min_intensity is not None:
            signals = [s for s in signals if abs(s.intensity) >= min_intensity]
        return sorted(signals, key=lambda s: abs(s.intensity), reverse=True)

    async def read_pressure(
        self,
        agent_id: str | None = None,
        signal_types: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        region: str | None = None,
    ) -> float:
        """The pressure ``agent_id`` feels now (None: the sum of every signal, as at a region)."""
        query = None
        if weights is None and type(signal_types) is tuple:  # the gate's reads: the same few queries
            key = (signal_types, region)
            with contextlib.suppress(TypeError):  # an unhashable entry: built as any other query
                query = self._queries.get(key)
                if query is None:
                    if len(self._queries) >= QUERY_CACHE:
                        self._queries.clear()
                    query = self._queries[key] = PressureQuery(signal_types, {}, region)
        if query is None:
            query = PressureQuery(_types(signal_types), _weights(weights), region)
        backend = self._backend if self._bound else await self._ready()
        return await backend.pressure(agent_id, query)

    async def read_pressures(
        self,
        agent_ids: Sequence[str] | None = None,
        signal_types: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        region: str | None = None,
    ) -> dict[str, float]:
        """The pressure of many agents in one pass (None: every agent the field knows)."""
        query = PressureQuery(_types(signal_types), _weights(weights), region)
        return await (await self._ready()).pressures(agent_ids, query)

    async def gradient(
        self, from_region: str, neighbor_regions: Sequence[str], signal_types: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Pressure at each neighbouring region minus pressure at ``from_region`` (positive: go there)."""
        here = await self.read_pressure(region=from_region, signal_types=signal_types)
        return {
            region: await self.read_pressure(region=region, signal_types=signal_types) - here
            for region in neighbor_regions
        }

    async def explain(
        self,
        agent_id: str | None = None,
        signal_types: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        region: str | None = None,
    ) -> Explanation:
        """The signals behind ``read_pressure(agent_id, ...)``: who put what there, what is left, when."""
        backend = await self._ready()
        weights = _weights(weights)
        selector = SignalFilter(
            visible_to=agent_id, exclude_agent_id=agent_id, signal_types=_types(signal_types), region=region
        )
        stored = await backend.signals(selector)
        now = await backend.now()
        contributions = []
        for s in stored:
            sig = s.signal
            if agent_id is not None and sig.target_agent_id == sig.agent_id:
                continue  # self-targeted: presses on nobody else
            weight = float(weights.get(sig.signal_type, 1.0))
            contributions.append(
                Contribution(
                    signal_id=sig.id,
                    agent_id=sig.agent_id,
                    signal_type=sig.signal_type,
                    deposited_intensity=sig.intensity,
                    value=s.value,
                    weight=weight,
                    contribution=weight * s.value,
                    deposited_at=sig.deposited_at,
                    evaporates_at=s.evaporates_at,
                    target_agent_id=sig.target_agent_id,
                    region=sig.region,
                )
            )
        contributions.sort(key=lambda c: abs(c.contribution), reverse=True)
        total = math.fsum(c.contribution for c in contributions)
        return Explanation(agent_id, total, now, tuple(contributions))

    async def signal_count(self) -> int:
        """How many signals the field stores (including any awaiting :meth:`decay`)."""
        return await (await self._ready()).count()

    async def aclose(self) -> None:
        """Release the backend's resources."""
        await self._backend.aclose()

    async def __aenter__(self) -> PheromoneField:
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _current(stored: StoredSignal) -> Signal:
        value = max(-1.0, min(1.0, stored.value))  # guards float noise only; values never grow
        return stored.signal.with_intensity(value)
