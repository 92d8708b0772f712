"""The embedded in-memory backend: numpy columns, decayed accumulators, an expiry index.

Layout, and why:

- Signals live in structure-of-arrays columns (59 bytes a signal, plus 16 in the
  expiry index), rows recycled through a free list; a signal id is
  ``"<row>-<generation>"`` so no per-signal dict is needed to find it. Columns grow
  by an eighth at a time (or to fit a batch), so spare capacity stays small.
- Signals whose strategy has a ``decay_rate`` (exponential, step) are summed into
  accumulators keyed by (scope, type, agent, region), two per signal and region
  level. One agent's pressure is ``public - own public + targeted at it``: three O(1)
  lookups per type. Accumulators decay lazily: ``S <- S * exp(-rate * (t - t_last)) + I``.
- Each accumulated signal has a precomputed evaporation time in an expiry index
  (log-structured sorted runs); reads first retire what expired, so a reading never
  depends on when ``evaporate`` last ran. Sorting, merging and compacting the index
  happen on deposits: a read only cuts the due prefix off each run.
- Single deposits take a scalar path (memoryviews, closed-form lifetimes), batches a
  vectorised one; names are interned without per-element Python loops where possible.
- Other strategies (linear, stochastic, user-defined) are evaluated vectorised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from stigmergy.backends.protocol import (
    DepositBatch,
    PressureQuery,
    SignalFilter,
    StoredSignal,
)
from stigmergy.clock import Clock, monotonic_clock
from stigmergy.decay import DecayPolicy, DecayStrategy, ExponentialDecay, StepDecay
from stigmergy.errors import BackendError, ConfigurationError, FieldCapacityError
from stigmergy.signal import Signal

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
SaltArray = npt.NDArray[np.uint64]
KeyArray = npt.NDArray[np.int32]

# Accumulator scopes. A reading for agent a is PUBLIC - FROM[a] + TO[a]; for nobody,
# PUBLIC + TARGETED. An untargeted signal adds to PUBLIC and FROM[its agent], a targeted one
# to TARGETED and TO[its target] (unless that is its own agent): two accumulators a row.
_PUBLIC, _TARGETED, _FROM, _TO = 0, 1, 2, 3
# A key code packs (scope, type, region code, agent), agent lowest: codes of one type and
# region differ only by agent id, a small range that groups without sorting (_group).
_TYPE_BITS, _AGENT_BITS, _REGION_BITS = 12, 24, 24
_SCOPE_SHIFT = _TYPE_BITS + _REGION_BITS + _AGENT_BITS
_MAX_TYPES, _MAX_AGENTS, _MAX_REGIONS = 1 << _TYPE_BITS, 1 << _AGENT_BITS, (1 << _REGION_BITS) - 1
# Key columns per row: (PUBLIC-or-TARGETED, FROM-or-TO) over all regions, then in its region.
_KEY_COLUMNS = 4
_FREE, _LIVE, _EXPIRED = 0, 1, 2
# A signal's salt (and expiry index entry) is row << 32 | generation.
_SALT_SHIFT = np.uint64(32)
_GENERATION = np.uint64(0xFFFFFFFF)
# Batches up to this size are stored signal by signal: numpy's per-call costs outweigh its
# per-element savings there (a gate's few spends per request went from ~400 µs to ~30 µs).
_SMALL_BATCH = 8


def _key_code(scope: int, type_id: int, agent: int, region_code: int) -> int:
    return (((scope << _TYPE_BITS | type_id) << _REGION_BITS | region_code) << _AGENT_BITS) | agent


def _key_codes(
    scope: int, type_ids: IntArray, agents: IntArray | int, region_codes: IntArray | int
) -> IntArray:
    codes = (np.int64(scope) << _TYPE_BITS) | type_ids
    codes = (codes << _REGION_BITS) | region_codes
    return np.asarray((codes << _AGENT_BITS) | agents, dtype=np.int64)


def _salts(rows: IntArray, gens: npt.NDArray[np.uint32]) -> SaltArray:
    return (rows.astype(np.uint64) << _SALT_SHIFT) | gens.astype(np.uint64)


def _view(array: np.ndarray[Any, Any]) -> memoryview[Any]:
    """A memoryview of a 1-D column (numpy's stubs declare its buffer only for Python 3.12+)."""
    return memoryview(array)  # type: ignore[arg-type]


def _all_same(values: Sequence[Any]) -> bool:
    """Whether every entry equals the first (a broadcast column); quick when the ends differ."""
    first = values[0]
    return bool(values[-1] == first) and values.count(first) == len(values)


def _group(codes: IntArray) -> tuple[IntArray, IntArray]:
    """The distinct ``codes`` (ascending) and each code's index among them.

    Codes spanning a small range (one type and region: agent ids) are grouped
    through a table over that range, in linear time; others are sorted.
    """
    low = int(codes.min())
    span = int(codes.max()) - low + 1
    if span > max(4 * len(codes), 1 << 16):
        unique, inverse = np.unique(codes, return_inverse=True)
        return unique, inverse.ravel()
    offsets = codes - low
    seen = np.zeros(span, dtype=bool)
    seen[offsets] = True
    present = np.flatnonzero(seen)
    index = np.zeros(span, dtype=np.int64)
    index[present] = np.arange(len(present))
    return present + low, index[offsets]


class _Names:
    """Interns strings to small ints so columns hold ints, not strings; None (no target, region) is -1.

    ``on_new(name)`` runs before a name is first interned (and may refuse it by raising).
    """

    def __init__(self, limit: int, what: str, on_new: Callable[[str], None] | None = None) -> None:
        self.ids: dict[str | None, int] = {None: -1}
        self.names: list[str] = []
        self._limit = limit
        self._what = what
        self._on_new = on_new

    def intern(self, name: str | None) -> int:
        found = self.ids.get(name)
        if found is not None:
            return found
        assert name is not None  # None is always known
        if len(self.names) >= self._limit:
            raise FieldCapacityError(
                f"a field indexes at most {self._limit} distinct {self._what}; "
                "use another field (or key_prefix) for the rest"
            )
        if self._on_new is not None:
            self._on_new(name)
        self.ids[name] = index = len(self.names)
        self.names.append(name)
        return index

    def intern_many(self, names: Sequence[str | None]) -> IntArray:
        """Ids of ``names``; new names are interned in order of first appearance."""
        n = len(names)
        if _all_same(names):
            return np.full(n, self.intern(names[0]), dtype=np.int64)
        ids = self.ids
        try:
            return np.fromiter(map(ids.__getitem__, names), dtype=np.int64, count=n)
        except KeyError:
            for name in dict.fromkeys(names):
                self.intern(name)
            return np.fromiter(map(ids.__getitem__, names), dtype=np.int64, count=n)


class _Columns:
    """Named numpy columns of one length that grow by an eighth (or to fit a batch).

    ``views`` holds a flat memoryview of each column: reading or writing one element
    through it costs half what numpy scalar indexing does (single deposits do little else).
    """

    def __init__(self, capacity: int, **dtypes: Any) -> None:
        self.capacity = capacity
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}
        for name, spec in dtypes.items():
            dtype, width = spec if isinstance(spec, tuple) else (spec, 0)
            shape = (capacity, width) if width else (capacity,)
            self.arrays[name] = np.zeros(shape, dtype=dtype)
        self.views = self._views()

    def ensure(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = max(size, self.capacity + max(self.capacity // 8, 64))
        for name, old in self.arrays.items():
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.capacity] = old
            self.arrays[name] = new
        self.capacity = capacity
        self.views = self._views()

    def _views(self) -> dict[str, memoryview[Any]]:
        return {name: _view(a.reshape(-1)) for name, a in self.arrays.items()}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class _Run:
    """A sorted run of the expiry index; entries before ``start`` are already taken."""

    __slots__ = ("head", "salts", "start", "times")

    def __init__(self, times: FloatArray, salts: SaltArray) -> None:
        self.times = times
        self.salts = salts
        self.start = 0
        self.head = float(times[0])  # the earliest time not yet taken

    def __len__(self) -> int:
        return len(self.times) - self.start

    def take_until(self, now: float) -> tuple[FloatArray, SaltArray]:
        """Remove and return the entries due at ``now``."""
        start = self.start
        cut = int(self.times.searchsorted(now, side="right"))  # the taken prefix is due too
        self.start = cut
        if cut < len(self.times):
            self.head = float(self.times[cut])
        return self.times[start:cut], self.salts[start:cut]

    def compact(self) -> None:
        """Free the taken prefix once it is most of the run: amortised O(1) a taken entry."""
        if 2 * self.start > len(self.times):
            self.times, self.salts, self.start = (
                self.times[self.start :].copy(),
                self.salts[self.start :].copy(),
                0,
            )


class _ExpiryIndex:
    """When each accumulated signal evaporates: (time, id) entries, id = row << 32 | generation.

    A batch of deposits becomes one sorted run; single deposits fill a small buffer
    that becomes a run when full. A new run is merged into the previous one while
    that one is at most twice its size, so there are O(log n) runs and an entry is
    re-sorted O(log n) times, all of it on deposits. Taking what is due cuts a
    sorted prefix off each run and scans the small buffer: no read sorts anything.
    """

    def __init__(self, buffer_size: int = 1024) -> None:
        self._runs: list[_Run] = []
        self._buffer_times = np.zeros(buffer_size)
        self._buffer_salts = np.zeros(buffer_size, dtype=np.uint64)
        self._buffer_views = _view(self._buffer_times), _view(self._buffer_salts)
        self._buffer_size = buffer_size
        self._buffered = 0
        self._buffer_head = math.inf  # earliest buffered time
        self.next_due = math.inf  # earliest time in the index

    def add_one(self, when: float, salt: int) -> None:
        i = self._buffered
        times, salts = self._buffer_views
        times[i] = when
        salts[i] = salt
        self._buffered = i + 1
        if when < self._buffer_head:
            self._buffer_head = when
            self.next_due = min(self.next_due, when)
        if self._buffered == self._buffer_size:
            self._buffered, self._buffer_head = 0, math.inf
            self.add(self._buffer_times.copy(), self._buffer_salts.copy())

    def add(self, times: FloatArray, salts: SaltArray) -> None:
        if len(times) == 0:
            return
        order = np.argsort(times)
        run = _Run(times[order], salts[order])
        self.next_due = min(self.next_due, run.head)
        runs = self._runs
        for older in runs:  # here rather than in take_due: reads never copy
            older.compact()
        runs.append(run)
        while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
            older, newer = runs[-2], runs[-1]
            times = np.concatenate([older.times[older.start :], newer.times[newer.start :]])
            salts = np.concatenate([older.salts[older.start :], newer.salts[newer.start :]])
            order = np.argsort(times, kind="stable")  # two sorted runs: a linear merge
            runs[-2:] = [_Run(times[order], salts[order])]

    def take_due(self, now: float) -> tuple[FloatArray, SaltArray]:
        """Remove and return every entry due at ``now`` (time <= now)."""
        parts = [run.take_until(now) for run in self._runs if run.head <= now]
        self._runs = [run for run in self._runs if len(run)]
        if self._buffer_head <= now:
            parts.append(self._take_buffered(now))
        self.next_due = min([run.head for run in self._runs] + [self._buffer_head])
        if len(parts) == 1:
            return parts[0]
        times = [p[0] for p in parts] or [np.zeros(0)]
        salts = [p[1] for p in parts] or [np.zeros(0, dtype=np.uint64)]
        return np.concatenate(times), np.concatenate(salts)

    def _take_buffered(self, now: float) -> tuple[FloatArray, SaltArray]:
        n = self._buffered
        times, salts = self._buffer_times[:n], self._buffer_salts[:n]
        due = times <= now
        taken = times[due], salts[due]
        kept = ~due
        left = n - len(taken[0])
        self._buffer_times[:left], self._buffer_salts[:left] = times[kept], salts[kept]
        self._buffered = left
        self._buffer_head = float(self._buffer_times[:left].min()) if left else math.inf
        return taken

    def nbytes(self) -> int:
        runs = sum(run.times.nbytes + run.salts.nbytes for run in self._runs)
        return runs + self._buffer_times.nbytes + self._buffer_salts.nbytes


class InMemoryFieldBackend:
    """The embedded default backend: one process, no server, numpy underneath.

    ``clock`` is any zero-argument callable returning monotonic seconds; pass a
    :class:`stigmergy.ManualClock` to move time by hand in tests.
    """

    def __init__(self, clock: Clock | None = None, initial_capacity: int = 1024) -> None:
        self._clock: Clock = clock or monotonic_clock
        self._wall_offset = time.time() - self._clock()
        self._policy: DecayPolicy | None = None
        self._agents = _Names(_MAX_AGENTS, "agents")
        self._types = _Names(_MAX_TYPES, "signal types", on_new=self._adopt_strategy)
        self._regions = _Names(_MAX_REGIONS, "regions")
        self._type_strategy: list[DecayStrategy] = []
        self._type_rate = np.zeros(0)  # decay rate per type id; nan = evaluated, not accumulated
        self._rates: list[float | None] = []  # the same, for scalar code
        self._type_lifetime: list[Callable[[float, int], float]] = []  # (intensity, salt) -> seconds
        self._rows = _Columns(
            initial_capacity,
            intensity=np.float64,
            t0=np.float64,
            expiry=np.float64,
            agent=np.int32,
            target=np.int32,
            type=np.int16,
            region=np.int32,
            gen=np.uint32,
            draw=np.uint32,  # deposit sequence number: the per-signal salt strategies draw from
            state=np.uint8,
            keys=(np.int32, _KEY_COLUMNS),
        )
        self._high_water = 0
        self._free = np.zeros(0, dtype=np.int64)
        self._n_free = 0
        self._n_stored = 0
        self._draws = 0  # deposits so far: salts follow deposit order, not which row was free
        self._metadata: dict[int, dict[str, Any]] = {}
        self._generic = np.zeros(0, dtype=np.int64)  # rows of non-accumulated strategies
        self._keys = _Columns(
            256,
            total=np.float64,
            t=np.float64,
            rate=np.float64,
            live=np.int64,
            scope=np.int8,
            type=np.int32,
            agent=np.int32,
            region=np.int32,
        )
        self._key_ids: dict[int, int] = {}
        self._n_keys = 0
        self._index = _ExpiryIndex()
        self._evaporated = 0  # expired since the last evaporate(), awaiting removal
        self._stale_entries = 0  # at least as many index entries as rescale and remove made stale
        self._closed = False

    # -- protocol: lifecycle ------------------------------------------------------

    async def bind(self, policy: DecayPolicy) -> None:
        if self._policy is not None and self._policy is not policy:
            raise ConfigurationError(
                "this backend already serves another PheromoneField; give each field its own backend"
            )
        self._policy = policy

    async def now(self) -> float:
        return self._clock()

    async def aclose(self) -> None:
        self._closed = True

    # -- protocol: writes ---------------------------------------------------------

    async def deposit(
        self,
        agent_id: str,
        signal_type: str,
        intensity: float,
        metadata: dict[str, Any],
        target_agent_id: str | None,
        region: str | None,
    ) -> Signal:
        now = self._clock()
        row = self._store_one(agent_id, signal_type, float(intensity), metadata, target_agent_id, region, now)
        # Positional arguments: cheaper than keywords, and this is the hottest path.
        return Signal(
            f"{row:x}-{self._rows.views['gen'][row]:x}",
            agent_id,
            signal_type,
            intensity,
            metadata,
            self._wall(now),
            target_agent_id,
            region,
            now,
        )

    def _store_one(
        self,
        agent_id: str,
        signal_type: str,
        value: float,
        metadata: dict[str, Any] | None,
        target_agent_id: str | None,
        region: str | None,
        now: float,
    ) -> int:
        """Store one signal deposited at ``now``; returns its row."""
        agent = self._agents.intern(agent_id)
        target = self._agents.intern(target_agent_id)
        type_id = self._types.intern(signal_type)
        region_id = self._regions.intern(region)
        row = self._allocate_one()
        cols, at = self._rows.arrays, self._rows.views
        at["intensity"][row] = value
        at["t0"][row] = now
        at["agent"][row] = agent
        at["target"][row] = target
        at["type"][row] = type_id
        at["region"][row] = region_id
        at["draw"][row] = self._draws & 0xFFFFFFFF
        at["state"][row] = _LIVE
        self._draws += 1
        self._n_stored += 1
        if metadata:
            self._metadata[row] = metadata
        rate = self._rates[type_id]
        if rate is None:
            cols["keys"][row] = -1
            at["expiry"][row] = math.inf
            self._generic = np.append(self._generic, row)
            return row
        self._accumulate_one(row, agent, target, type_id, region_id, value, rate, now)
        expiry = now + self._type_lifetime[type_id](value, at["draw"][row])
        at["expiry"][row] = expiry
        self._index.add_one(expiry, row << 32 | at["gen"][row])
        return row

    async def deposit_many(self, batch: DepositBatch) -> int:
        n = len(batch)
        if n == 0:
            return 0
        for floor in batch.floors:  # no await suspends in here: checked and stored in one step
            query = PressureQuery(signal_types=(floor.signal_type,), region=floor.region)
            if await self.pressure(None, query) < floor.at_least:
                return 0
        now = self._clock()
        if n <= _SMALL_BATCH:
            metadata, intensities = batch.metadata, batch.intensities.tolist()
            for i in range(n):
                self._store_one(
                    batch.agent_ids[i],
                    batch.signal_types[i],
                    intensities[i],
                    None if metadata is None else metadata[i],
                    batch.target_agent_ids[i],
                    batch.regions[i],
                    now,
                )
            return n
        agents = self._agents.intern_many(batch.agent_ids)
        targets = self._agents.intern_many(batch.target_agent_ids)
        types = self._types.intern_many(batch.signal_types)
        regions = self._regions.intern_many(batch.regions)
        intensity = np.asarray(batch.intensities, dtype=np.float64)
        rows, at = self._allocate(n)
        cols = self._rows.arrays
        cols["intensity"][at] = intensity
        cols["t0"][at] = now
        cols["agent"][at] = agents
        cols["target"][at] = targets
        cols["type"][at] = types
        cols["region"][at] = regions
        cols["draw"][at] = (np.arange(self._draws, self._draws + n) & 0xFFFFFFFF).astype(np.uint32)
        cols["state"][at] = _LIVE
        self._draws += n
        self._n_stored += n
        if batch.metadata is not None:
            for row, meta in zip(rows.tolist(), batch.metadata, strict=True):
                if meta:
                    self._metadata[row] = meta
        if np.isnan(self._type_rate).any():
            generic = np.isnan(self._type_rate[types])
            if generic.any():
                self._generic = np.concatenate([self._generic, rows[generic]])
                cols["keys"][rows[generic]] = -1
                cols["expiry"][rows[generic]] = math.inf
                acc = ~generic
                if not acc.any():
                    return n
                rows, agents, targets, types = rows[acc], agents[acc], targets[acc], types[acc]
                regions, intensity = regions[acc], intensity[acc]
                at = rows
        keys = self._row_keys_many(agents, targets, types, regions)
        cols["keys"][at] = keys
        self._accumulate(keys, intensity, now)
        expiry = now + self._lifetimes(types, intensity, cols["draw"][at].astype(np.uint64))
        cols["expiry"][at] = expiry
        self._index.add(expiry, _salts(rows, cols["gen"][at]))
        return n

    async def rescale(
        self,
        factor: float,
        *,
        signal_id: str | None = None,
        region: str | None = None,
        signal_type: str | None = None,
    ) -> list[StoredSignal]:
        now = self._clock()
        self._expire(now)
        if signal_id is not None:
            row = self._row_of(signal_id)
            rows = np.zeros(0, dtype=np.int64) if row is None else np.array([row])
        else:
            rows = self._select(
                SignalFilter(signal_types=None if signal_type is None else (signal_type,), region=region)
            )
        rows = rows[self._visible(rows, now)]
        cols = self._rows.arrays
        old = cols["intensity"][rows]
        new = np.clip(old * factor, -1.0, 1.0)
        changed = new != old
        rows, old, new = rows[changed], old[changed], new[changed]
        if len(rows) == 0:
            return []
        cols["intensity"][rows] = new
        types = cols["type"][rows].astype(np.int64)
        rates = self._type_rate[types]
        acc = ~np.isnan(rates)
        if acc.any():
            arows = rows[acc]
            delta = (new[acc] - old[acc]) * np.exp(-rates[acc] * (now - cols["t0"][arows]))
            self._accumulate(cols["keys"][arows], delta, now, count=0)
            draws = cols["draw"][arows].astype(np.uint64)
            expiry = cols["t0"][arows] + self._lifetimes(types[acc], new[acc], draws)
            moved = expiry != cols["expiry"][arows]  # an unchanged time keeps its (still valid) entry
            arows, expiry = arows[moved], expiry[moved]
            self._stale_entries += len(arows)  # their previous entries
            cols["expiry"][arows] = expiry
            self._index.add(expiry, _salts(arows, cols["gen"][arows]))
        return self._stored(rows, now)

    async def remove(self, *, agent_id: str | None = None, region: str | None = None) -> int:
        now = self._clock()
        self._expire(now)
        rows = self._select(SignalFilter(agent_id=agent_id, region=region), states=(_LIVE, _EXPIRED))
        cols = self._rows.arrays
        live = rows[cols["state"][rows] == _LIVE]
        acc = live[~np.isnan(self._type_rate[cols["type"][live]])]
        if len(acc):
            self._subtract(cols["keys"][acc], cols["intensity"][acc], cols["t0"][acc])
            self._stale_entries += len(acc)  # their entries stay in the index
        self._evaporated -= int(np.count_nonzero(cols["state"][rows] == _EXPIRED))
        self._release(rows)
        return len(rows)

    async def evaporate(self) -> int:
        now = self._clock()
        self._expire(now)
        cols = self._rows.arrays
        generic = self._generic
        if len(generic):
            faded = generic[np.abs(self._values(generic, now)) < self._threshold]
            cols["state"][faded] = _EXPIRED
            self._evaporated += len(faded)
        if self._evaporated:  # counts every expired row (at least): none counted, nothing to scan for
            self._release(np.flatnonzero(cols["state"][: self._high_water] == _EXPIRED))
        count, self._evaporated = self._evaporated, 0
        self._compact_keys()
        return count

    # -- protocol: reads ----------------------------------------------------------

    async def pressure(self, agent_id: str | None, query: PressureQuery) -> float:
        now = self._clock()
        self._expire(now)
        region_code = self._region_code(query.region)
        if region_code is None:
            return 0.0
        scopes: tuple[tuple[int, float], ...]
        if agent_id is None:
            agent, scopes = 0, ((_PUBLIC, 1.0), (_TARGETED, 1.0))
        else:
            found = self._agents.ids.get(agent_id)
            agent = -1 if found is None else found
            scopes = ((_PUBLIC, 1.0), (_FROM, -1.0), (_TO, 1.0)) if found is not None else ((_PUBLIC, 1.0),)
        k = self._keys.arrays
        total, t, rate = k["total"], k["t"], k["rate"]
        result = 0.0
        generic_types: list[int] = []
        for type_id, weight in self._weighted_types(query):
            if self._rates[type_id] is None:
                generic_types.append(type_id)
                continue
            for scope, sign in scopes:
                kid = self._key_ids.get(_key_code(scope, type_id, 0 if scope < _FROM else agent, region_code))
                if kid is not None:
                    result += (
                        sign
                        * weight
                        * float(total[kid])
                        * math.exp(-float(rate[kid]) * (now - float(t[kid])))
                    )
        if generic_types and len(self._generic):
            rows = self._generic
            cols = self._rows.arrays
            mask = np.isin(cols["type"][rows], generic_types) & self._in_region(rows, region_code)
            if agent_id is not None:
                mask &= self._visible_to(rows, agent) & (cols["agent"][rows] != agent)
            rows = rows[mask]
            values = self._values(rows, now)
            visible = np.abs(values) >= self._threshold
            weights = self._weight_array(query)[cols["type"][rows]]
            result += float((values * weights)[visible].sum())
        return result

    async def pressures(self, agent_ids: Sequence[str] | None, query: PressureQuery) -> dict[str, float]:
        now = self._clock()
        self._expire(now)
        names = self._agents.names
        n_agents = len(names)
        per_agent = np.zeros(n_agents)
        public = 0.0
        region_code = self._region_code(query.region)
        if region_code is not None:
            weights = self._weight_array(query)
            k = self._keys.arrays
            nk = self._n_keys
            kid = np.flatnonzero(
                (k["region"][:nk] == region_code) & (weights[k["type"][:nk]] != 0) & (k["live"][:nk] > 0)
            )
            current = (
                k["total"][kid] * np.exp(-k["rate"][kid] * (now - k["t"][kid])) * weights[k["type"][kid]]
            )
            scope = k["scope"][kid]
            public += float(current[scope == _PUBLIC].sum())
            per_agent -= np.bincount(k["agent"][kid][scope == _FROM], current[scope == _FROM], n_agents)
            per_agent += np.bincount(k["agent"][kid][scope == _TO], current[scope == _TO], n_agents)
            rows = self._generic
            if len(rows):
                cols = self._rows.arrays
                rows = rows[self._in_region(rows, region_code) & (weights[cols["type"][rows]] != 0)]
                values = self._values(rows, now)
                visible = np.abs(values) >= self._threshold
                rows, values = rows[visible], values[visible] * weights[cols["type"][rows[visible]]]
                untargeted = cols["target"][rows] < 0
                public += float(values[untargeted].sum())
                per_agent -= np.bincount(cols["agent"][rows[untargeted]], values[untargeted], n_agents)
                targeted = ~untargeted & (cols["target"][rows] != cols["agent"][rows])
                per_agent += np.bincount(cols["target"][rows[targeted]], values[targeted], n_agents)
        per_agent += public
        if agent_ids is None:
            return dict(zip(names, per_agent.tolist(), strict=True))
        ids = self._agents.ids
        return {name: (float(per_agent[ids[name]]) if name in ids else public) for name in agent_ids}

    async def signals(self, selector: SignalFilter) -> list[StoredSignal]:
        now = self._clock()
        self._expire(now)
        rows = self._select(selector)
        return self._stored(rows[self._visible(rows, now)], now)

    async def get(self, signal_id: str) -> StoredSignal | None:
        now = self._clock()
        self._expire(now)
        row = self._row_of(signal_id)
        if row is None:
            return None
        rows = np.array([row])
        stored = self._stored(rows[self._visible(rows, now)], now)
        return stored[0] if stored else None

    async def count(self) -> int:
        return self._n_stored

    async def agents(self) -> list[str]:
        return list(self._agents.names)

    # -- introspection --------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes held by the columns, accumulators and expiry index (not Python overhead)."""
        return (
            self._rows.nbytes()
            + self._keys.nbytes()
            + self._index.nbytes()
            + self._free.nbytes
            + self._generic.nbytes
        )

    # -- internals: types, names, keys ----------------------------------------------

    @property
    def _threshold(self) -> float:
        return self._bound_policy().evaporation_threshold

    def _bound_policy(self) -> DecayPolicy:
        if self._policy is None:
            raise BackendError("the backend is not bound to a field; use it through PheromoneField")
        return self._policy

    def _adopt_strategy(self, signal_type: str) -> None:
        """Take the field's strategy for a type seen for the first time (its id is the next one)."""
        strategy = self._bound_policy().strategy(signal_type)
        self._type_strategy.append(strategy)
        self._type_lifetime.append(self._scalar_lifetime(strategy))
        rate = None if strategy.decay_rate is None else float(strategy.decay_rate)
        self._rates.append(rate)
        self._type_rate = np.append(self._type_rate, np.nan if rate is None else rate)

    def _region_code(self, region: str | None) -> int | None:
        """0 for 'every region', region id + 1 for one, None for a region never seen."""
        if region is None:
            return 0
        found = self._regions.ids.get(region)
        return None if found is None else found + 1

    def _weighted_types(self, query: PressureQuery) -> list[tuple[int, float]]:
        ids = self._types.ids
        names = self._types.names if query.signal_types is None else dict.fromkeys(query.signal_types)
        return [
            (ids[name], float(query.weights.get(name, 1.0)))
            for name in names
            if name in ids and query.weights.get(name, 1.0) != 0
        ]

    def _weight_array(self, query: PressureQuery) -> FloatArray:
        weights = np.zeros(len(self._types.names))
        for type_id, weight in self._weighted_types(query):
            weights[type_id] = weight
        return weights

    def _row_keys_many(
        self, agents: IntArray, targets: IntArray, types: IntArray, regions: IntArray
    ) -> KeyArray:
        n = len(agents)
        keys = np.full((n, _KEY_COLUMNS), -1, dtype=np.int32)
        untargeted = targets < 0
        to_other = ~untargeted & (targets != agents)
        everywhere = np.ones(n, dtype=bool)
        for offset, region_codes, rows_in in ((0, 0, everywhere), (2, regions + 1, regions >= 0)):
            columns = (
                (0, _PUBLIC, 0, rows_in & untargeted),
                (0, _TARGETED, 0, rows_in & ~untargeted),
                (1, _FROM, agents, rows_in & untargeted),
                (1, _TO, targets, rows_in & to_other),
            )
            for column, scope, who, mask in columns:
                if mask.any():
                    sel = np.flatnonzero(mask)
                    codes = _key_codes(
                        scope,
                        types[sel],
                        who if isinstance(who, int) else who[sel],
                        region_codes if isinstance(region_codes, int) else region_codes[sel],
                    )
                    keys[sel, offset + column] = self._kids_of(codes)
        return keys

    def _kids_of(self, codes: IntArray) -> KeyArray:
        """Accumulator ids for key codes; missing accumulators are created in ascending code order."""
        unique, inverse = _group(codes)
        wanted = unique.tolist()
        kids = list(map(self._key_ids.get, wanted))
        if None in kids:
            kids = [self._key(code) if kid is None else kid for code, kid in zip(wanted, kids, strict=True)]
        return np.asarray(kids, dtype=np.int32)[inverse]

    def _key(self, code: int) -> int:
        kid = self._key_ids.get(code)
        if kid is not None:
            return kid
        kid = self._n_keys
        self._keys.ensure(kid + 2)  # the last slot stays spare: "no key" (-1) indexes it, a sink
        k = self._keys.arrays
        agent = code & ((1 << _AGENT_BITS) - 1)
        region_code = (code >> _AGENT_BITS) & ((1 << _REGION_BITS) - 1)
        type_id = (code >> (_AGENT_BITS + _REGION_BITS)) & ((1 << _TYPE_BITS) - 1)
        k["scope"][kid] = code >> _SCOPE_SHIFT
        k["type"][kid] = type_id
        k["agent"][kid] = agent
        k["region"][kid] = region_code
        k["rate"][kid] = self._type_rate[type_id]
        k["total"][kid] = 0.0
        k["t"][kid] = 0.0
        k["live"][kid] = 0
        self._key_ids[code] = kid
        self._n_keys += 1
        return kid

    def _accumulate_one(
        self,
        row: int,
        agent: int,
        target: int,
        type_id: int,
        region: int,
        value: float,
        rate: float,
        now: float,
    ) -> None:
        """Give one new row its keys and add ``value`` to those accumulators (decayed to ``now`` first).

        Scalar code through memoryviews: for one row, numpy calls cost more than the work.
        """
        keys = [-1] * _KEY_COLUMNS
        for offset, region_code in ((0, 0),) if region < 0 else ((0, 0), (2, region + 1)):
            if target < 0:
                keys[offset] = self._key(_key_code(_PUBLIC, type_id, 0, region_code))
                keys[offset + 1] = self._key(_key_code(_FROM, type_id, agent, region_code))
            else:
                keys[offset] = self._key(_key_code(_TARGETED, type_id, 0, region_code))
                if target != agent:
                    keys[offset + 1] = self._key(_key_code(_TO, type_id, target, region_code))
        k = self._keys.views  # after _key(), which may have grown the table
        total, t, live = k["total"], k["t"], k["live"]
        row_keys, first = self._rows.views["keys"], row * _KEY_COLUMNS
        for column, kid in enumerate(keys):
            row_keys[first + column] = kid
            if kid >= 0:
                total[kid] = total[kid] * math.exp(-rate * (now - t[kid])) + value
                t[kid] = now
                live[kid] += 1

    def _accumulate(self, keys: KeyArray, values: FloatArray, now: float, count: int = 1) -> None:
        """Add ``values`` (one per row, worth that at ``now``) to each of the rows' keys, after
        decaying those keys to ``now``; ``count`` new members a row (1 deposited, 0 rescaled)."""
        if keys.size >= self._n_keys:
            self._accumulate_reduced(keys, values, now, count)
            return
        k = self._keys.arrays
        total, t, rate, live = k["total"], k["t"], k["rate"], k["live"]
        kids = keys.ravel().astype(np.intp)  # "no key" (-1) lands in the spare last slot
        per_key = np.repeat(values, keys.shape[1])
        # A key listed twice gets the same decayed value written twice.
        total[kids] = total[kids] * np.exp(rate[kids] * (t[kids] - now))
        t[kids] = now
        np.add.at(total, kids, per_key)
        if count:
            np.add.at(live, kids, count)

    def _accumulate_reduced(self, keys: KeyArray, values: FloatArray, now: float, count: int) -> None:
        """``_accumulate`` for many rows: sum per key first (a pass over the keys, no sort)."""
        k = self._keys.arrays
        total, t, rate, live = k["total"], k["t"], k["rate"], k["live"]
        slots = keys.ravel().astype(np.intp) + 1  # no key (-1) goes to slot 0, dropped
        bins = self._n_keys + 1
        hits = np.bincount(slots, minlength=bins)[1:]
        sums = np.bincount(slots, np.repeat(values, keys.shape[1]), bins)[1:]
        touched = np.flatnonzero(hits)
        decayed = total[touched] * np.exp(-rate[touched] * (now - t[touched]))
        total[touched] = decayed + sums[touched]
        t[touched] = now
        if count:
            live[touched] += count * hits[touched]

    def _subtract(self, keys: KeyArray, intensity: FloatArray, t0: FloatArray) -> None:
        """Take signals (one per row of ``keys``) out of their accumulators: retired or removed.

        Each is subtracted at its accumulator's own time t (never before its deposit time
        t0), where it is worth ``I * exp(-rate * (t - t0))``: nothing needs decaying first.
        """
        k = self._keys.arrays
        total, t, rate, live = k["total"], k["t"], k["rate"], k["live"]
        width = keys.shape[1]
        kids = keys.ravel().astype(np.intp)  # "no key" (-1) lands in the spare last slot
        values = np.repeat(intensity, width) * np.exp(rate[kids] * (np.repeat(t0, width) - t[kids]))
        if len(kids) < self._n_keys:
            np.subtract.at(total, kids, values)
            np.subtract.at(live, kids, 1)
            emptied = kids[live[kids] == 0]
        else:  # many rows: sum per key first (a pass over the keys, no sort)
            nk = self._n_keys
            total[:nk] -= np.bincount(kids + 1, values, nk + 1)[1:]  # bin 0: no key, dropped
            live[:nk] -= np.bincount(kids + 1, minlength=nk + 1)[1:]
            emptied = np.flatnonzero(live[:nk] == 0)
        total[emptied] = 0.0  # no members left: drop accumulated rounding

    def _compact_keys(self) -> None:
        """Forget accumulators with no live member once they are most of the table."""
        nk = self._n_keys
        k = self._keys.arrays
        keep = k["live"][:nk] > 0
        dead = nk - int(np.count_nonzero(keep))
        if dead < max(1024, nk // 2):
            return
        remap = np.full(nk + 1, -1, dtype=np.int32)  # index -1 (no key) maps to -1
        kept = np.flatnonzero(keep)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        for column in k.values():
            column[: len(kept)] = column[kept]
        codes = np.fromiter(self._key_ids.keys(), dtype=np.int64, count=len(self._key_ids))
        old_ids = np.fromiter(self._key_ids.values(), dtype=np.int64, count=len(self._key_ids))
        alive = keep[old_ids]
        self._key_ids = dict(zip(codes[alive].tolist(), remap[old_ids[alive]].tolist(), strict=True))
        self._n_keys = len(kept)
        cols = self._rows.arrays
        cols["keys"][: self._high_water] = remap[cols["keys"][: self._high_water]]

    # -- internals: rows ---------------------------------------------------------------

    def _allocate(self, n: int) -> tuple[IntArray, IntArray | slice]:
        """``n`` rows, freed ones first, and how to index them: a slice when they are all fresh."""
        reused = min(n, self._n_free)
        fresh = n - reused
        start = self._high_water
        if fresh:
            self._rows.ensure(start + fresh)
            self._high_water += fresh
        new = np.arange(start, start + fresh)
        if not reused:
            return new, slice(start, start + fresh)
        rows = self._free[self._n_free - reused : self._n_free].copy()
        self._n_free -= reused
        rows = np.concatenate([rows, new]) if fresh else rows
        return rows, rows

    def _allocate_one(self) -> int:
        if self._n_free:
            self._n_free -= 1
            return int(self._free[self._n_free])
        row = self._high_water
        self._rows.ensure(row + 1)
        self._high_water = row + 1
        return row

    def _release(self, rows: IntArray) -> None:
        if len(rows) == 0:
            return
        cols = self._rows.arrays
        generic = np.isnan(self._type_rate[cols["type"][rows]])
        cols["state"][rows] = _FREE
        cols["gen"][rows] += np.uint32(1)
        if self._metadata:
            for row in rows.tolist():
                self._metadata.pop(row, None)
        if generic.any():
            self._generic = self._generic[cols["state"][self._generic] == _LIVE]
        self._free = np.concatenate([self._free[: self._n_free], rows])
        self._n_free = len(self._free)
        self._n_stored -= len(rows)

    def _row_of(self, signal_id: str) -> int | None:
        try:
            row_text, gen_text = signal_id.split("-")
            row, gen = int(row_text, 16), int(gen_text, 16)
        except (AttributeError, ValueError):
            return None
        cols = self._rows.arrays
        if not 0 <= row < self._high_water or int(cols["gen"][row]) != gen or cols["state"][row] == _FREE:
            return None
        return row

    def _select(self, selector: SignalFilter, states: tuple[int, ...] = (_LIVE,)) -> IntArray:
        cols = self._rows.arrays
        n = self._high_water
        mask = np.isin(cols["state"][:n], states)
        if selector.agent_id is not None:
            found = self._agents.ids.get(selector.agent_id)
            if found is None:
                return np.zeros(0, dtype=np.int64)
            mask &= cols["agent"][:n] == found
        if selector.exclude_agent_id is not None and selector.exclude_agent_id in self._agents.ids:
            mask &= cols["agent"][:n] != self._agents.ids[selector.exclude_agent_id]
        if selector.visible_to is not None:
            found = self._agents.ids.get(selector.visible_to, -2)
            mask &= (cols["target"][:n] < 0) | (cols["target"][:n] == found)
        if selector.signal_types is not None:
            type_ids = [self._types.ids[t] for t in selector.signal_types if t in self._types.ids]
            mask &= np.isin(cols["type"][:n], type_ids)
        if selector.region is not None:
            found = self._regions.ids.get(selector.region)
            if found is None:
                return np.zeros(0, dtype=np.int64)
            mask &= cols["region"][:n] == found
        return np.flatnonzero(mask)

    def _in_region(self, rows: IntArray, region_code: int) -> npt.NDArray[np.bool_]:
        if region_code == 0:
            return np.ones(len(rows), dtype=bool)
        return np.asarray(self._rows.arrays["region"][rows] == region_code - 1)

    def _visible_to(self, rows: IntArray, agent: int) -> npt.NDArray[np.bool_]:
        target = self._rows.arrays["target"][rows]
        return np.asarray((target < 0) | (target == agent))

    def _values(self, rows: IntArray, now: float) -> FloatArray:
        """Current values of ``rows`` by each row's own strategy (vectorised per type)."""
        cols = self._rows.arrays
        types = cols["type"][rows]
        out = np.empty(len(rows))
        for type_id in np.unique(types).tolist():
            sel = types == type_id
            chosen = rows[sel]
            out[sel] = self._type_strategy[type_id].apply(
                cols["intensity"][chosen], now - cols["t0"][chosen], cols["draw"][chosen].astype(np.uint64)
            )
        return out

    def _lifetimes(self, types: IntArray, intensity: FloatArray, salts: SaltArray) -> FloatArray:
        first = int(types[0])
        if (types == first).all():
            life = self._type_strategy[first].lifetime(intensity, self._threshold, salts)
            return np.asarray(life, dtype=np.float64)
        out = np.empty(len(types))
        for type_id in np.unique(types).tolist():
            sel = types == type_id
            out[sel] = self._type_strategy[type_id].lifetime(intensity[sel], self._threshold, salts[sel])
        return out

    def _scalar_lifetime(self, strategy: DecayStrategy) -> Callable[[float, int], float]:
        """One signal's lifetime, for single deposits: the built-in accumulated strategies in
        closed form without arrays, with the same floating-point operations as their
        vectorised ``lifetime`` (the expiry index compares times for equality)."""
        threshold = self._threshold
        if type(strategy) is ExponentialDecay:
            half_life = strategy.half_life_seconds

            def exponential(intensity: float, salt: int) -> float:
                magnitude = abs(intensity)
                return 0.0 if magnitude < threshold else half_life * float(np.log2(magnitude / threshold))

            return exponential
        if type(strategy) is StepDecay:
            ttl = strategy.ttl_seconds
            return lambda intensity, salt: 0.0 if abs(intensity) < threshold else ttl

        def general(intensity: float, salt: int) -> float:
            salts = np.array([salt], dtype=np.uint64)
            return float(strategy.lifetime(np.array([intensity]), threshold, salts)[0])

        return general

    def _visible(self, rows: IntArray, now: float) -> npt.NDArray[np.bool_]:
        """Live rows worth at least the threshold (accumulated rows: not yet expired)."""
        cols = self._rows.arrays
        visible = cols["state"][rows] == _LIVE
        generic = np.isnan(self._type_rate[cols["type"][rows]])
        if generic.any():
            faded = np.abs(self._values(rows[generic], now)) < self._threshold
            visible[np.flatnonzero(generic)[faded]] = False
        return np.asarray(visible)

    def _stored(self, rows: IntArray, now: float) -> list[StoredSignal]:
        if len(rows) == 0:
            return []
        cols = self._rows.arrays
        values = self._values(rows, now)
        types = cols["type"][rows].astype(np.int64)
        expiry = cols["expiry"][rows].copy()
        generic = np.isnan(self._type_rate[types])
        if generic.any():
            g = rows[generic]
            salts = cols["draw"][g].astype(np.uint64)
            expiry[generic] = cols["t0"][g] + self._lifetimes(types[generic], cols["intensity"][g], salts)
        agents, types_, regions = self._agents.names, self._types.names, self._regions.names
        out = []
        for i, row in enumerate(rows.tolist()):
            target, region = int(cols["target"][row]), int(cols["region"][row])
            t0 = float(cols["t0"][row])
            out.append(
                StoredSignal(
                    signal=Signal(
                        id=f"{row:x}-{int(cols['gen'][row]):x}",
                        agent_id=agents[int(cols["agent"][row])],
                        signal_type=types_[int(cols["type"][row])],
                        intensity=float(cols["intensity"][row]),
                        metadata=self._metadata.get(row, {}),
                        created_at=self._wall(t0),
                        target_agent_id=None if target < 0 else agents[target],
                        region=None if region < 0 else regions[region],
                        deposited_at=t0,
                    ),
                    value=float(values[i]),
                    evaporates_at=float(expiry[i]),
                )
            )
        return out

    def _wall(self, t: float) -> datetime:
        return datetime.fromtimestamp(self._wall_offset + t, tz=UTC)

    # -- internals: expiry index ----------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Retire accumulated signals whose evaporation time has come (amortised O(log n) each)."""
        if now < self._index.next_due or self._closed:
            return
        expiry, salts = self._index.take_due(now)
        rows = (salts >> _SALT_SHIFT).astype(np.intp)
        cols = self._rows.arrays
        if self._stale_entries:
            # Skip entries made stale by a rescale (another expiry) or by the row's reuse (another
            # generation), and entries of rows already retired.
            valid = (cols["expiry"][rows] == expiry) & (cols["gen"][rows] == (salts & _GENERATION))
            valid &= cols["state"][rows] == _LIVE
            taken = len(rows)
            # A time rescaled away and back (A -> B -> A) leaves two valid entries: retire once.
            rows = np.unique(rows[valid])
            self._stale_entries -= taken - len(rows)
            if len(rows) == 0:
                return
        self._subtract(cols["keys"].take(rows, axis=0), cols["intensity"][rows], cols["t0"][rows])
        cols["state"][rows] = _EXPIRED
        self._evaporated += len(rows)
