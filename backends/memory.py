"""The embedded in-memory backend: numpy columns, decayed accumulators, an expiry index.

Layout, and why:

- Signals live in structure-of-arrays columns (about 70 bytes a signal), rows
  recycled through a free list; a signal id is ``"<row>-<generation>"`` so no
  per-signal dict is needed to find it.
- Signals whose strategy has a ``decay_rate`` (exponential, step) are summed into
  accumulators keyed by (scope, type, agent, region). One agent's pressure is
  ``public - own public + targeted at it``: three O(1) lookups per type.
  Accumulators decay lazily: ``S <- S * exp(-rate * (t - t_last)) + I``.
- Each accumulated signal has a precomputed evaporation time in an expiry index
  (log-structured sorted runs); reads first retire what expired, so a reading
  never depends on when ``evaporate`` last ran.
- Other strategies (linear, stochastic, user-defined) are evaluated vectorised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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
from stigmergy.decay import DecayPolicy, DecayStrategy
from stigmergy.errors import BackendError, ConfigurationError, FieldCapacityError
from stigmergy.signal import Signal

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Accumulator scopes. A reading for agent a is PUBLIC - FROM[a] + TO[a]; for nobody, ANY.
_ANY, _PUBLIC, _FROM, _TO = 0, 1, 2, 3
_TYPE_BITS, _AGENT_BITS, _REGION_BITS = 12, 24, 24
_MAX_TYPES, _MAX_AGENTS, _MAX_REGIONS = 1 << _TYPE_BITS, 1 << _AGENT_BITS, (1 << _REGION_BITS) - 1
# Key columns per row: (ANY, PUBLIC-or-TO, FROM) over all regions, then the same in its region.
_KEY_COLUMNS = 6
_FREE, _LIVE, _EXPIRED = 0, 1, 2


def _key_code(scope: int, type_id: int, agent: int, region_code: int) -> int:
    return (((scope << _TYPE_BITS | type_id) << _AGENT_BITS | agent) << _REGION_BITS) | region_code


def _key_codes(scope: int, type_ids: IntArray, agents: IntArray, region_codes: IntArray) -> IntArray:
    codes = (np.int64(scope) << _TYPE_BITS) | type_ids
    codes = (codes << _AGENT_BITS) | agents
    return np.asarray((codes << _REGION_BITS) | region_codes, dtype=np.int64)


def _salts(rows: IntArray, gens: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint64]:
    return (rows.astype(np.uint64) << np.uint64(32)) | gens.astype(np.uint64)


class _Names:
    """Interns strings to small ints so columns hold ints, not strings."""

    def __init__(self, limit: int, what: str) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self._limit = limit
        self._what = what

    def intern(self, name: str) -> int:
        found = self.ids.get(name)
        if found is not None:
            return found
        if len(self.names) >= self._limit:
            raise FieldCapacityError(
                f"a field indexes at most {self._limit} distinct {self._what}; "
                "use another field (or key_prefix) for the rest"
            )
        self.ids[name] = index = len(self.names)
        self.names.append(name)
        return index

    def intern_many(self, names: Sequence[str]) -> IntArray:
        unique = {name: self.intern(name) for name in dict.fromkeys(names)}
        return np.fromiter((unique[n] for n in names), dtype=np.int64, count=len(names))


class _Columns:
    """Named numpy columns of one length that grow by doubling."""

    def __init__(self, capacity: int, **dtypes: Any) -> None:
        self.capacity = capacity
        self.dtypes = dtypes
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}
        for name, spec in dtypes.items():
            dtype, width = spec if isinstance(spec, tuple) else (spec, 0)
            shape = (capacity, width) if width else (capacity,)
            self.arrays[name] = np.zeros(shape, dtype=dtype)

    def ensure(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = max(size, self.capacity * 2)
        for name, old in self.arrays.items():
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.capacity] = old
            self.arrays[name] = new
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


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
        self._types = _Names(_MAX_TYPES, "signal types")
        self._regions = _Names(_MAX_REGIONS, "regions")
        self._type_strategy: list[DecayStrategy] = []
        self._type_rate = np.zeros(0)  # decay rate per type id; nan = evaluated, not accumulated
        self._rows = _Columns(
            initial_capacity,
            intensity=np.float64,
            t0=np.float64,
            expiry=np.float64,
            agent=np.int32,
            target=np.int32,
            type=np.int32,
            region=np.int32,
            gen=np.uint32,
            state=np.uint8,
            keys=(np.int32, _KEY_COLUMNS),
        )
        self._high_water = 0
        self._free = np.zeros(0, dtype=np.int64)
        self._n_free = 0
        self._n_stored = 0
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
        # Expiry index: sorted runs of (time, row, generation), plus entries not yet sorted.
        self._runs: list[tuple[FloatArray, IntArray, npt.NDArray[np.uint32]]] = []
        self._pending: list[tuple[FloatArray, IntArray, npt.NDArray[np.uint32]]] = []
        self._pending_one: list[tuple[float, int, int]] = []
        self._next_expiry = math.inf
        self._evaporated = 0  # expired since the last evaporate(), awaiting removal
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
        agent = self._agents.intern(agent_id)
        target = -1 if target_agent_id is None else self._agents.intern(target_agent_id)
        type_id = self._type(signal_type)
        region_id = -1 if region is None else self._regions.intern(region)
        row = self._allocate(1)[0]
        signal = Signal(
            id=f"{row:x}-{int(self._rows.arrays['gen'][row]):x}",
            agent_id=agent_id,
            signal_type=signal_type,
            intensity=intensity,
            metadata=metadata,
            created_at=self._wall(now),
            target_agent_id=target_agent_id,
            region=region,
            deposited_at=now,
        )
        cols = self._rows.arrays
        cols["intensity"][row] = intensity
        cols["t0"][row] = now
        cols["agent"][row] = agent
        cols["target"][row] = target
        cols["type"][row] = type_id
        cols["region"][row] = region_id
        cols["state"][row] = _LIVE
        self._n_stored += 1
        if metadata:
            self._metadata[row] = metadata
        rate = float(self._type_rate[type_id])
        if math.isnan(rate):
            cols["keys"][row] = -1
            self._generic = np.append(self._generic, row)
            cols["expiry"][row] = math.inf
            return signal
        keys = self._row_keys(agent, target, type_id, region_id)
        cols["keys"][row] = keys
        k = self._keys.arrays
        total, t, live = k["total"], k["t"], k["live"]
        for kid in keys:
            if kid >= 0:
                total[kid] = total[kid] * math.exp(-rate * (now - t[kid])) + intensity
                t[kid] = now
                live[kid] += 1
        expiry = now + float(
            self._type_strategy[type_id].lifetime(
                np.array([intensity]), self._threshold, _salts(np.array([row]), cols["gen"][row : row + 1])
            )[0]
        )
        cols["expiry"][row] = expiry
        self._pending_one.append((expiry, row, int(cols["gen"][row])))
        self._next_expiry = min(self._next_expiry, expiry)
        return signal

    async def deposit_many(self, batch: DepositBatch) -> int:
        n = len(batch)
        if n == 0:
            return 0
        now = self._clock()
        agents = self._agents.intern_many(batch.agent_ids)
        targets = self._optional_ids(self._agents, batch.target_agent_ids)
        types = self._types_of(batch.signal_types)
        regions = self._optional_ids(self._regions, batch.regions)
        intensity = np.asarray(batch.intensities, dtype=np.float64)
        rows = self._allocate(n)
        cols = self._rows.arrays
        cols["intensity"][rows] = intensity
        cols["t0"][rows] = now
        cols["agent"][rows] = agents
        cols["target"][rows] = targets
        cols["type"][rows] = types
        cols["region"][rows] = regions
        cols["state"][rows] = _LIVE
        self._n_stored += n
        if batch.metadata is not None:
            for row, meta in zip(rows.tolist(), batch.metadata, strict=True):
                if meta:
                    self._metadata[row] = meta
        rates = self._type_rate[types]
        generic = np.isnan(rates)
        if generic.any():
            self._generic = np.concatenate([self._generic, rows[generic]])
            cols["keys"][rows[generic]] = -1
            cols["expiry"][rows[generic]] = math.inf
        acc = ~generic
        if not acc.any():
            return n
        rows, agents, targets, types = rows[acc], agents[acc], targets[acc], types[acc]
        regions, intensity = regions[acc], intensity[acc]
        keys = self._row_keys_many(agents, targets, types, regions)
        cols["keys"][rows] = keys
        self._accumulate(keys, intensity, now)
        expiry = now + self._lifetimes(rows, types, intensity)
        cols["expiry"][rows] = expiry
        self._pending.append((expiry, rows, cols["gen"][rows].copy()))
        self._next_expiry = min(self._next_expiry, float(expiry.min()))
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
            expiry = cols["t0"][arows] + self._lifetimes(arows, types[acc], new[acc])
            cols["expiry"][arows] = expiry
            self._pending.append((expiry, arows, cols["gen"][arows].copy()))
            self._next_expiry = min(self._next_expiry, float(expiry.min()))
        return self._stored(rows, now)

    async def remove(self, *, agent_id: str | None = None, region: str | None = None) -> int:
        now = self._clock()
        self._expire(now)
        rows = self._select(SignalFilter(agent_id=agent_id, region=region), states=(_LIVE, _EXPIRED))
        cols = self._rows.arrays
        live = rows[cols["state"][rows] == _LIVE]
        types = cols["type"][live].astype(np.int64)
        rates = self._type_rate[types]
        acc = live[~np.isnan(rates)]
        if len(acc):
            values = cols["intensity"][acc] * np.exp(-rates[~np.isnan(rates)] * (now - cols["t0"][acc]))
            self._accumulate(cols["keys"][acc], -values, now, count=-1)
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
        expired = np.flatnonzero(cols["state"][: self._high_water] == _EXPIRED)
        self._release(expired)
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
            agent, scopes = 0, ((_ANY, 1.0),)
        else:
            found = self._agents.ids.get(agent_id)
            agent = -1 if found is None else found
            scopes = ((_PUBLIC, 1.0), (_FROM, -1.0), (_TO, 1.0)) if found is not None else ((_PUBLIC, 1.0),)
        k = self._keys.arrays
        total, t, rate = k["total"], k["t"], k["rate"]
        result = 0.0
        generic_types: list[int] = []
        for type_id, weight in self._weighted_types(query):
            if math.isnan(self._type_rate[type_id]):
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
        runs = sum(e.nbytes + r.nbytes + g.nbytes for e, r, g in self._runs + self._pending)
        return self._rows.nbytes() + self._keys.nbytes() + runs + self._free.nbytes + self._generic.nbytes

    # -- internals: types, names, keys ----------------------------------------------

    @property
    def _threshold(self) -> float:
        if self._policy is None:
            raise BackendError("the backend is not bound to a field; use it through PheromoneField")
        return self._policy.evaporation_threshold

    def _type(self, signal_type: str) -> int:
        type_id = self._types.intern(signal_type)
        if type_id == len(self._type_strategy):
            if self._policy is None:
                raise BackendError("the backend is not bound to a field; use it through PheromoneField")
            strategy = self._policy.strategy(signal_type)
            self._type_strategy.append(strategy)
            rate = strategy.decay_rate
            self._type_rate = np.append(self._type_rate, np.nan if rate is None else float(rate))
        return type_id

    def _types_of(self, signal_types: Sequence[str]) -> IntArray:
        unique = {name: self._type(name) for name in dict.fromkeys(signal_types)}
        return np.fromiter((unique[s] for s in signal_types), dtype=np.int64, count=len(signal_types))

    @staticmethod
    def _optional_ids(names: _Names, values: Sequence[str | None]) -> IntArray:
        present = [v for v in values if v is not None]
        if not present:
            return np.full(len(values), -1, dtype=np.int64)
        unique = {name: names.intern(name) for name in dict.fromkeys(present)}
        return np.fromiter(
            (-1 if v is None else unique[v] for v in values), dtype=np.int64, count=len(values)
        )

    def _region_code(self, region: str | None) -> int | None:
        """0 for 'every region', region id + 1 for one, None for a region never seen."""
        if region is None:
            return 0
        found = self._regions.ids.get(region)
        return None if found is None else found + 1

    def _weighted_types(self, query: PressureQuery) -> list[tuple[int, float]]:
        ids = self._types.ids
        names = self._types.names if query.signal_types is None else query.signal_types
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

    def _row_keys(self, agent: int, target: int, type_id: int, region: int) -> list[int]:
        keys = [-1] * _KEY_COLUMNS
        codes = (0,) if region < 0 else (0, region + 1)
        for offset, region_code in zip((0, 3), codes, strict=False):
            keys[offset] = self._key(_key_code(_ANY, type_id, 0, region_code))
            if target < 0:
                keys[offset + 1] = self._key(_key_code(_PUBLIC, type_id, 0, region_code))
                keys[offset + 2] = self._key(_key_code(_FROM, type_id, agent, region_code))
            elif target != agent:
                keys[offset + 1] = self._key(_key_code(_TO, type_id, target, region_code))
        return keys

    def _row_keys_many(
        self, agents: IntArray, targets: IntArray, types: IntArray, regions: IntArray
    ) -> npt.NDArray[np.int32]:
        n = len(agents)
        keys = np.full((n, _KEY_COLUMNS), -1, dtype=np.int32)
        zero = np.zeros(n, dtype=np.int64)
        untargeted = targets < 0
        to_other = ~untargeted & (targets != agents)
        has_region = regions >= 0
        for offset, region_codes, rows_in in (
            (0, zero, np.ones(n, dtype=bool)),
            (3, regions + 1, has_region),
        ):
            columns = (
                (0, _key_codes(_ANY, types, zero, region_codes), rows_in),
                (1, _key_codes(_PUBLIC, types, zero, region_codes), rows_in & untargeted),
                (1, _key_codes(_TO, types, targets, region_codes), rows_in & to_other),
                (2, _key_codes(_FROM, types, agents, region_codes), rows_in & untargeted),
            )
            for column, codes, mask in columns:
                if mask.any():
                    unique, inverse = np.unique(codes[mask], return_inverse=True)
                    kids = np.array([self._key(int(c)) for c in unique.tolist()], dtype=np.int32)
                    keys[mask, offset + column] = kids[inverse]
        return keys

    def _key(self, code: int) -> int:
        kid = self._key_ids.get(code)
        if kid is not None:
            return kid
        kid = self._n_keys
        self._keys.ensure(kid + 1)
        k = self._keys.arrays
        region_code = code & ((1 << _REGION_BITS) - 1)
        agent = (code >> _REGION_BITS) & ((1 << _AGENT_BITS) - 1)
        type_id = (code >> (_REGION_BITS + _AGENT_BITS)) & ((1 << _TYPE_BITS) - 1)
        k["scope"][kid] = code >> (_REGION_BITS + _AGENT_BITS + _TYPE_BITS)
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

    def _accumulate(
        self, keys: npt.NDArray[np.int32], values: FloatArray, now: float, count: int = 1
    ) -> None:
        """Add ``values`` (one per row) to each of the rows' keys, after decaying those keys to ``now``."""
        k = self._keys.arrays
        flat = keys.ravel()
        present = flat >= 0
        kids = flat[present].astype(np.int64)
        if len(kids) == 0:
            return
        per_row = np.repeat(values, keys.shape[1])[present]
        touched = np.unique(kids)
        k["total"][touched] *= np.exp(-k["rate"][touched] * (now - k["t"][touched]))
        k["t"][touched] = now
        np.add.at(k["total"], kids, per_row)
        if count:
            np.add.at(k["live"], kids, count)
            empty = touched[k["live"][touched] == 0]
            k["total"][empty] = 0.0  # no members left: drop accumulated rounding

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

    def _allocate(self, n: int) -> IntArray:
        reused = min(n, self._n_free)
        rows = self._free[self._n_free - reused : self._n_free].copy()
        self._n_free -= reused
        fresh = n - reused
        if fresh:
            self._rows.ensure(self._high_water + fresh)
            rows = np.concatenate([rows, np.arange(self._high_water, self._high_water + fresh)])
            self._high_water += fresh
        return rows

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
                cols["intensity"][chosen], now - cols["t0"][chosen], _salts(chosen, cols["gen"][chosen])
            )
        return out

    def _lifetimes(self, rows: IntArray, types: IntArray, intensity: FloatArray) -> FloatArray:
        cols = self._rows.arrays
        out = np.empty(len(rows))
        for type_id in np.unique(types).tolist():
            sel = types == type_id
            out[sel] = self._type_strategy[type_id].lifetime(
                intensity[sel], self._threshold, _salts(rows[sel], cols["gen"][rows[sel]])
            )
        return out

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
            expiry[generic] = cols["t0"][g] + self._lifetimes(g, types[generic], cols["intensity"][g])
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
        """Retire accumulated signals whose evaporation time has come (amortised O(1) each)."""
        if now < self._next_expiry or self._closed:
            return
        self._flush_pending()
        due: list[tuple[FloatArray, IntArray, npt.NDArray[np.uint32]]] = []
        runs = []
        for expiry, rows, gens in self._runs:
            cut = int(np.searchsorted(expiry, now, side="right"))
            if cut:
                due.append((expiry[:cut], rows[:cut], gens[:cut]))
            if cut < len(expiry):
                runs.append((expiry[cut:], rows[cut:], gens[cut:]))
        self._runs = runs
        self._next_expiry = min((float(r[0][0]) for r in runs), default=math.inf)
        if not due:
            return
        expiry = np.concatenate([d[0] for d in due])
        rows = np.concatenate([d[1] for d in due])
        gens = np.concatenate([d[2] for d in due])
        cols = self._rows.arrays
        # Entries made stale by a rescale (new expiry) or a reuse of the row are skipped.
        valid = (
            (cols["state"][rows] == _LIVE) & (cols["gen"][rows] == gens) & (cols["expiry"][rows] == expiry)
        )
        rows = rows[valid]
        if len(rows) == 0:
            return
        rates = self._type_rate[cols["type"][rows]]
        values = cols["intensity"][rows] * np.exp(-rates * (now - cols["t0"][rows]))
        self._accumulate(cols["keys"][rows], -values, now, count=-1)
        cols["state"][rows] = _EXPIRED
        self._evaporated += len(rows)

    def _flush_pending(self) -> None:
        if self._pending_one:
            e, r, g = zip(*self._pending_one, strict=True)
            self._pending.append((np.array(e), np.array(r, dtype=np.int64), np.array(g, dtype=np.uint32)))
            self._pending_one = []
        if not self._pending:
            return
        expiry = np.concatenate([p[0] for p in self._pending])
        rows = np.concatenate([p[1] for p in self._pending])
        gens = np.concatenate([p[2] for p in self._pending])
        self._pending = []
        order = np.argsort(expiry, kind="stable")
        self._runs.append((expiry[order], rows[order], gens[order]))
        # Log-structured merging keeps O(log n) runs and amortised O(log n) work per entry.
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (e1, r1, g1), (e2, r2, g2) = self._runs[-2], self._runs[-1]
            expiry, rows, gens = np.concatenate([e1, e2]), np.concatenate([r1, r2]), np.concatenate([g1, g2])
            order = np.argsort(expiry, kind="stable")
            self._runs[-2:] = [(expiry[order], rows[order], gens[order])]
