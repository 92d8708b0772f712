"""Property tests: PheromoneField against a pure-Python reference model.

The reference keeps every deposited signal (time, depositor, target, region, type,
deposit intensity) and evaluates each decay strategy's closed form with ``math``:

    P_a(t) = sum over visible s of w(type_s) * I_s * f_s(t - t_s)

visible = untargeted or targeted at ``a``, not deposited by ``a`` (``a`` None: every
signal), in the region / of the types asked for, and ``|I_s f_s(age)| >=
threshold``. ``decay()`` only frees memory.

Floating point makes the exact evaporation boundary ambiguous (the in-memory backend
decides it from a precomputed expiry time, the reference from the value), so a
reading that involves a signal within ~1e-9 of its boundary is not compared, and a
state change that depends on such a signal (decay, amplify, reinforce) makes the
affected parts of the reference "uncertain" instead of guessing.

A signal's decay salt (what ``StochasticDecay`` draws its half-life from) is its
deposit sequence number: the backend counts accepted deposits from 0 (a batch of n
takes the next n numbers in batch order; a refused deposit takes none), mod 2**32.

Time only moves through a ``ManualClock``; each hypothesis example drives its own
event loop with ``anyio.run``.

The random sequences include what once tripped the library (rescales that leave an
evaporation time unchanged or return to an earlier one, types listed twice in
``signal_types``, refused deposits, stochastic signals deposited after ``decay()``);
each of those also has its own minimal regression test below.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from stigmergy import (
    ExponentialDecay,
    InMemoryFieldBackend,
    InvalidSignalError,
    LinearDecay,
    ManualClock,
    PheromoneField,
    StepDecay,
    StochasticDecay,
)

M64 = (1 << 64) - 1
AGENTS = ["a0", "a1", "a2"]
TARGETS = [None, "a0", "a1", "a2", "ghost"]  # ghost is targeted but never deposits
READERS: list[str | None] = [None, "a0", "a1", "a2", "ghost", "nobody"]  # nobody: unknown
REGIONS = [None, "r0", "r1"]
READ_REGIONS = [None, "r0", "r1", "r9"]  # r9: never used
TYPES = ["t0", "t1", "t2", "task_complete"]
REL = ABS = 1e-9
BOUNDARY = 1e-9

# -- decay strategies: specs, library objects, and the closed forms by hand -------------

Spec = tuple[Any, ...]

half_lives = st.one_of(st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0]), st.floats(0.1, 1000.0))
linear_rates = st.one_of(st.sampled_from([0.001, 0.01, 0.1, 0.5]), st.floats(0.001, 1.0))
ttls = st.one_of(st.sampled_from([1.0, 2.5, 10.0]), st.floats(0.1, 100.0))
seeds = st.one_of(st.integers(0, M64), st.integers(-(2**63), 2**63))

deterministic_specs = st.one_of(
    st.tuples(st.just("exp"), half_lives),
    st.tuples(st.just("lin"), linear_rates),
    st.tuples(st.just("step"), ttls),
)
stochastic_specs = st.tuples(st.just("sto"), half_lives, st.floats(0.0, 0.9), seeds)
all_specs = st.one_of(deterministic_specs, stochastic_specs)


def build(spec: Spec) -> Any:
    kind = spec[0]
    if kind == "exp":
        return ExponentialDecay(spec[1])
    if kind == "lin":
        return LinearDecay(spec[1])
    if kind == "step":
        return StepDecay(spec[1])
    return StochasticDecay(spec[1], spec[2], seed=spec[3])


def unit_noise(salt: int, seed: int) -> float:
    """splitmix64's finaliser on salt ^ seed, mapped to [-1, 1)."""
    z = (salt ^ seed) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return (z >> 11) / 2.0**52 - 1.0


def ref_half_life(spec: Spec, salt: int) -> float:
    _, h, noise, seed = spec
    return h * (1.0 + noise * unit_noise(salt, seed & M64))


def ref_apply(spec: Spec, intensity: float, age: float, salt: int | None) -> float:
    kind = spec[0]
    if kind == "exp":
        return intensity * 2.0 ** (-age / spec[1])
    if kind == "step":
        return intensity if age < spec[1] else 0.0
    if kind == "lin":
        magnitude = max(abs(intensity) - spec[1] * age, 0.0)
        return math.copysign(magnitude, intensity) if magnitude > 0 else 0.0
    assert salt is not None
    return intensity * 2.0 ** (-age / ref_half_life(spec, salt))


SALT_MOD = 1 << 32  # the deposit sequence number (the salt) wraps at 2**32


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


# -- field configuration and operations ----------------------------------------------------


@dataclass(frozen=True)
class Config:
    default: Spec
    by_type: dict[str, Spec]
    threshold: float
    max_amplification: float
    persistent_ttl: float
    start: float

    def spec(self, signal_type: str) -> Spec:
        if signal_type in self.by_type:
            return self.by_type[signal_type]
        if signal_type == "task_complete":
            return ("step", self.persistent_ttl)
        return self.default

    def make_field(self, clock: ManualClock) -> PheromoneField:
        return PheromoneField(
            InMemoryFieldBackend(clock=clock, initial_capacity=4),
            decay_strategy=build(self.default),
            evaporation_threshold=self.threshold,
            max_amplification=self.max_amplification,
            persistent_ttl=self.persistent_ttl,
            decay_by_type={name: build(spec) for name, spec in self.by_type.items()},
        )


def configs(
    specs: st.SearchStrategy[Spec], by_type: st.SearchStrategy[Spec] | None = None
) -> st.SearchStrategy[Config]:
    """Field configurations; ``by_type`` (if given) decays t1, t2 and task_complete, ``specs`` the rest."""
    chosen = (
        st.dictionaries(st.sampled_from(TYPES), specs, max_size=4)
        if by_type is None
        else st.dictionaries(st.sampled_from(TYPES[1:]), by_type, max_size=3)
    )
    return st.builds(
        Config,
        default=specs,
        by_type=chosen,
        threshold=st.sampled_from([0.01, 0.05, 0.2]),
        max_amplification=st.sampled_from([3.0, 1.5, 10.0]),
        persistent_ttl=ttls,
        start=st.sampled_from([0.0, 1000.0, 1e6]),
    )


intensities = st.one_of(
    st.floats(-1.0, 1.0), st.sampled_from([1.0, -1.0, 0.0, 0.5, -0.3, 0.01, 0.05, 0.2, 0.9])
)
factors = st.one_of(st.floats(0.0, 6.0), st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0]))
advances = st.one_of(
    st.just(0.0),
    st.floats(0.0, 3.0),
    st.floats(0.0, 50.0),
    st.sampled_from([0.5, 1.0, 2.5, 10.0, 100.0, 1e4, 1e7]),
)
entries = st.tuples(
    st.sampled_from(AGENTS),
    st.sampled_from(TYPES),
    intensities,
    st.sampled_from(TARGETS),
    st.sampled_from(REGIONS),
)
batch_rows = st.one_of(
    st.lists(entries, min_size=1, max_size=6),
    # rows repeated within the batch: identical batch-mates (told apart only by their salts)
    st.lists(entries, min_size=1, max_size=3).flatmap(
        lambda base: st.lists(st.sampled_from(base), min_size=2, max_size=6)
    ),
)
bad_intensities = st.one_of(
    st.sampled_from([1.5, -1.5, 2.0, 1.0000000000000002, -1.0000000000000002, math.nan, math.inf, -math.inf]),
    st.floats(1.0, 1e300, exclude_min=True),
    st.floats(-1e300, -1.0, exclude_max=True),
)
# A deposit the field must refuse: its intensity is not a finite number in [-1, 1].
bad_entries = st.tuples(
    st.sampled_from([*AGENTS, "newcomer"]),  # newcomer: would become known if the refusal left a trace
    st.sampled_from([*TYPES, "t_new"]),
    bad_intensities,
    st.sampled_from([*TARGETS, "newcomer_target"]),
    st.sampled_from([*REGIONS, "r_new"]),
)


@st.composite
def refused_batches(draw: st.DrawFn) -> tuple[Any, ...]:
    """A batch with at least one refused row: the whole batch must be refused."""
    good = draw(st.lists(entries, max_size=5))
    bad = draw(st.lists(bad_entries, min_size=1, max_size=2))
    rows = draw(st.permutations([*good, *bad]))
    return ("refused_batch", rows, draw(st.booleans()))


OPERATIONS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "deposit": st.tuples(st.just("deposit"), entries),
    "refused": st.tuples(st.just("refused"), bad_entries),
    "refused_batch": refused_batches(),
    "batch": st.tuples(st.just("batch"), batch_rows, st.booleans()),
    "advance": st.tuples(st.just("advance"), advances),
    "decay": st.tuples(st.just("decay")),
    "amplify": st.tuples(st.just("amplify"), st.integers(0, 10**6), factors),
    "reinforce": st.tuples(
        st.just("reinforce"), st.sampled_from(["r0", "r1", "r9"]), st.sampled_from([None, *TYPES]), factors
    ),
    "clear_agent": st.tuples(st.just("clear_agent"), st.sampled_from([*AGENTS, "ghost"])),
    "clear_region": st.tuples(st.just("clear_region"), st.sampled_from(["r0", "r1"])),
}
OPERATION_MIX = [  # how often each operation is drawn
    *["deposit"] * 6,
    *["batch"] * 2,
    *["advance"] * 6,
    *["decay"] * 2,
    *["amplify"] * 4,
    *["reinforce"] * 2,
    "clear_agent",
    "clear_region",
    "refused",
    "refused_batch",
]
operations = st.sampled_from(OPERATION_MIX).flatmap(OPERATIONS.__getitem__)
weights_values = st.one_of(st.floats(-2.0, 2.0), st.sampled_from([0.0, 1.0, 2.0, -1.0]))
queries = st.tuples(
    st.one_of(st.none(), st.lists(st.sampled_from([*TYPES, "zz"]), max_size=4).map(tuple)),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(TYPES), weights_values, max_size=3)),
    st.sampled_from(READ_REGIONS),
)
Query = tuple[tuple[str, ...] | None, dict[str, float] | None, str | None]


# -- the reference model ---------------------------------------------------------------------


@dataclass
class RefSignal:
    agent: str
    type: str
    intensity: float
    target: str | None
    region: str | None
    t0: float
    spec: Spec
    salt: int  # its deposit sequence number, mod 2**32
    id: str | None = None  # None: never seen by the field's readers (invisible at deposit)
    removed: bool = False
    uncertain: bool = False  # a state change hit it at its boundary: its fate is unknown


class Harness:
    """One field plus its reference model, driven operation by operation."""

    def __init__(self, config: Config, decay_mode: str) -> None:
        self.cfg = config
        self.th = config.threshold
        self.clock = ManualClock(config.start)
        self.field = config.make_field(self.clock)
        self.mode = decay_mode  # "random": decay ops run; "never": skipped; "always": after every op
        self.sigs: list[RefSignal] = []
        self.deposits = 0  # accepted deposits so far: the next signal's salt
        self.known_ids: set[str] = set()
        self.known_agents: set[str] = set()
        self.counts_uncertain = False
        self.checked = 0
        self.skipped = 0
        self.stats: Counter[str] = Counter()

    # reference evaluation

    @property
    def now(self) -> float:
        return self.clock()

    def value(self, s: RefSignal, age: float | None = None) -> float:
        age = self.now - s.t0 if age is None else age
        return ref_apply(s.spec, s.intensity, age, s.salt)

    def visible(self, s: RefSignal) -> bool:
        return not s.removed and abs(self.value(s)) >= self.th

    def ambiguous(self, s: RefSignal) -> bool:
        """Within float noise of its evaporation boundary (in value or in age)."""
        if s.removed:
            return False
        if s.uncertain:
            return True
        age = self.now - s.t0
        if abs(abs(self.value(s, age)) - self.th) <= BOUNDARY * self.th:
            return True
        d = BOUNDARY * max(1.0, abs(age))
        return (abs(self.value(s, age - d)) >= self.th) != (abs(self.value(s, age + d)) >= self.th)

    def matching(
        self, agent: str | None, types: tuple[str, ...] | None, region: str | None
    ) -> list[RefSignal]:
        out = []
        for s in self.sigs:
            if s.removed:
                continue
            if region is not None and s.region != region:
                continue
            if types is not None and s.type not in types:
                continue
            if agent is not None and (s.agent == agent or (s.target is not None and s.target != agent)):
                continue
            out.append(s)
        return out

    def expected(self, agent: str | None, q: Query) -> tuple[float | None, dict[str, float] | None]:
        """(pressure, {signal id: value}) by the reference; None where a boundary makes it unknowable."""
        types, weights, region = q
        weights = weights or {}
        terms: list[float] = []
        contributions: dict[str, float] | None = {}
        pressure_known = True
        for s in self.matching(agent, types, region):
            w = weights.get(s.type, 1.0)
            if self.ambiguous(s):
                contributions = None
                if w != 0:
                    pressure_known = False
                continue
            if self.visible(s):
                v = self.value(s)
                terms.append(w * v)
                if contributions is not None:
                    assert s.id is not None, "a visible signal always has an id"
                    contributions[s.id] = v
        return (math.fsum(terms) if pressure_known else None), contributions

    # operations

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "deposit":
            await self.deposit(*op[1])
        elif kind == "batch":
            await self.batch(op[1], op[2])
        elif kind == "advance":
            self.clock.advance(op[1])
        elif kind == "decay":
            if self.mode == "random":
                await self.decay()
        elif kind == "refused":
            await self.refused(op[1])
        elif kind == "refused_batch":
            await self.refused_batch(op[1], op[2])
        elif kind == "amplify":
            await self.amplify(op[1], op[2])
        elif kind == "reinforce":
            await self.reinforce(op[1], op[2], op[3])
        elif kind == "clear_agent":
            await self.clear(lambda s: s.agent == op[1], await self.field.clear_agent(op[1]))
        elif kind == "clear_region":
            await self.clear(lambda s: s.region == op[1], await self.field.clear_region(op[1]))
        else:  # pragma: no cover
            raise AssertionError(op)
        if self.mode == "always":
            await self.decay()
        await self.check_counts()

    def _add(
        self, agent: str, type_: str, intensity: float, target: str | None, region: str | None
    ) -> RefSignal:
        s = RefSignal(
            agent,
            type_,
            float(intensity),
            target,
            region,
            self.now,
            self.cfg.spec(type_),
            self.deposits % SALT_MOD,
        )
        self.deposits += 1
        self.sigs.append(s)
        self.known_agents.add(agent)
        if target is not None:
            self.known_agents.add(target)
        return s

    async def deposit(
        self, agent: str, type_: str, intensity: float, target: str | None, region: str | None
    ) -> None:
        signal = await self.field.deposit(agent, type_, intensity, target_agent_id=target, region=region)
        assert (signal.agent_id, signal.signal_type, signal.intensity) == (agent, type_, intensity)
        assert (signal.target_agent_id, signal.region, signal.deposited_at) == (target, region, self.now)
        assert signal.id not in self.known_ids
        s = self._add(agent, type_, intensity, target, region)
        s.id = signal.id
        self.known_ids.add(signal.id)

    async def _deposit_batch(self, rows: list[tuple[Any, ...]], broadcast: bool, tag: bool) -> int:
        """One deposit_many call; ``tag``: each row's metadata is {"row": its batch position}."""
        metadata = [{"row": i} for i in range(len(rows))] if tag else None
        if broadcast:  # one agent, type and intensity for the whole batch, passed as scalars
            agent, type_, intensity = rows[0][:3]
            return await self.field.deposit_many(
                agent,
                type_,
                intensity,
                target_agent_ids=[r[3] for r in rows],
                regions=[r[4] for r in rows],
                metadata=metadata,
            )
        regions = [r[4] for r in rows]
        return await self.field.deposit_many(
            [r[0] for r in rows],
            [r[1] for r in rows],
            np.array([r[2] for r in rows]),
            target_agent_ids=[r[3] for r in rows],
            regions=None if all(r is None for r in regions) else regions,
            metadata=metadata,
        )

    async def batch(self, rows: list[tuple[Any, ...]], broadcast: bool) -> None:
        if broadcast:
            agent, type_, intensity = rows[0][:3]
            rows = [(agent, type_, intensity, r[3], r[4]) for r in rows]
        # Batch-mates identical in every attribute are interchangeable, unless their decay
        # draws from the salt (their deposit sequence numbers differ): then tag each row
        # with its batch position, to tell which id went to which row.
        tag = any(n > 1 and self.cfg.spec(key[1])[0] == "sto" for key, n in Counter(map(tuple, rows)).items())
        self.stats["tagged batch"] += tag
        n = await self._deposit_batch(rows, broadcast, tag)
        assert n == len(rows)
        added = [self._add(*r) for r in rows]
        # Learn the new signals' ids from a reading: at age 0 a signal is worth exactly its
        # deposit intensity, so it is visible iff |I| >= threshold.
        waiting: dict[tuple[Any, ...], list[RefSignal]] = defaultdict(list)
        for i, s in enumerate(added):
            key = (s.agent, s.type, s.target, s.region, s.intensity, i if tag else None)
            waiting[key].append(s)
        for signal in await self.field.read(None):
            if signal.id in self.known_ids:
                continue
            key = (
                signal.agent_id,
                signal.signal_type,
                signal.target_agent_id,
                signal.region,
                signal.intensity,
                signal.metadata["row"] if tag else None,
            )
            assert waiting.get(key), f"read() shows a signal nobody deposited: {signal!r}"
            assert signal.deposited_at == self.now
            s = waiting[key].pop()
            s.id = signal.id
            self.known_ids.add(signal.id)
        for s in added:
            if s.id is None:  # not visible at deposit
                assert abs(s.intensity) < self.th or (
                    s.spec[0] == "exp" and abs(s.intensity) - self.th <= BOUNDARY * self.th
                ), f"a signal visible at deposit is missing from read(): {s!r}"

    async def _unchanged_after_refusal(self, before: tuple[int, dict[str, float], float]) -> None:
        after = (
            await self.field.signal_count(),
            await self.field.read_pressures(),
            await self.field.read_pressure(None),
        )
        assert set(after[1]) == self.known_agents, "a refused deposit made its agents known"
        assert after[0] == before[0], "a refused deposit changed signal_count()"
        assert after[1] == before[1] and after[2] == before[2], "a refused deposit changed a reading"

    async def _before_refusal(self) -> tuple[int, dict[str, float], float]:
        return (
            await self.field.signal_count(),
            await self.field.read_pressures(),
            await self.field.read_pressure(None),
        )

    async def refused(self, row: tuple[Any, ...]) -> None:
        agent, type_, intensity, target, region = row
        before = await self._before_refusal()
        with pytest.raises(InvalidSignalError):
            await self.field.deposit(agent, type_, intensity, target_agent_id=target, region=region)
        self.stats["refused"] += 1
        await self._unchanged_after_refusal(before)

    async def refused_batch(self, rows: list[tuple[Any, ...]], broadcast: bool) -> None:
        if broadcast:  # the scalar intensity is the refused one
            bad = next(r for r in rows if not (math.isfinite(r[2]) and abs(r[2]) <= 1.0))
            rows = [(bad[0], bad[1], bad[2], r[3], r[4]) for r in rows]
        before = await self._before_refusal()
        with pytest.raises(InvalidSignalError):
            await self._deposit_batch(rows, broadcast, tag=False)
        self.stats["refused batch"] += 1
        await self._unchanged_after_refusal(before)

    async def decay(self) -> None:
        n = await self.field.decay()
        live = [s for s in self.sigs if not s.removed]
        if any(self.ambiguous(s) for s in live):
            self.counts_uncertain = True
        gone = [s for s in live if not self.ambiguous(s) and not self.visible(s)]
        self.stats["evaporated"] += len(gone) > 0
        if not self.counts_uncertain:
            assert n == len(gone), f"decay() returned {n}, {len(gone)} signals fell under the threshold"
        for s in gone:
            s.removed = True
        if not self.counts_uncertain:
            assert await self.field.signal_count() == sum(self.visible(s) for s in self.sigs)

    async def amplify(self, pick: int, factor: float) -> None:
        if not self.sigs:
            return
        s = self.sigs[pick % len(self.sigs)]
        result = await self.field.amplify(s.id or "fffff-0", factor)
        if result is not None:
            assert abs(result.intensity) <= 1.0
        if s.removed or s.id is None:
            assert result is None
            return
        new = max(-1.0, min(1.0, s.intensity * min(factor, self.cfg.max_amplification)))
        if self.ambiguous(s):
            s.uncertain = self.counts_uncertain = True
            s.intensity = new  # maybe
            return
        if not self.visible(s):
            assert result is None, "amplify() returned a signal that has evaporated"
            return
        self.stats["amplified"] += s.intensity != new
        s.intensity = new
        assert result is not None
        assert result.id == s.id
        assert close(result.intensity, self.value(s)), (result.intensity, self.value(s))

    async def reinforce(self, region: str, type_: str | None, factor: float) -> None:
        selected = [
            s
            for s in self.sigs
            if not s.removed and s.region == region and (type_ is None or s.type == type_)
        ]
        n = await self.field.reinforce(region, type_, factor)
        f = min(factor, self.cfg.max_amplification)
        changed = 0
        exact = True
        for s in selected:
            new = max(-1.0, min(1.0, s.intensity * f))
            if self.ambiguous(s):
                s.uncertain = self.counts_uncertain = True
                s.intensity = new  # maybe
                exact = False
                continue
            if self.visible(s):
                changed += new != s.intensity
                s.intensity = new
        self.stats["reinforced"] += changed > 0
        if exact:
            assert n == changed, f"reinforce() changed {n} signals, expected {changed}"

    async def clear(self, selected: Any, n: int) -> None:
        gone = [s for s in self.sigs if not s.removed and selected(s)]
        if not self.counts_uncertain:
            assert n == len(gone)
        for s in gone:
            s.removed = True
            s.uncertain = False

    # checks

    async def check_counts(self) -> None:
        if not self.counts_uncertain:
            assert await self.field.signal_count() == sum(not s.removed for s in self.sigs)

    async def readings(self, qs: list[Query]) -> list[float]:
        """Check every reader under every query against the reference; return the readings."""
        snapshot = []
        for qi, q in enumerate(qs):
            types, weights, region = q
            self.stats["type listed twice"] += types is not None and len(set(types)) < len(types)
            singles: dict[str | None, float] = {}
            for reader in READERS:
                p = singles[reader] = await self.field.read_pressure(reader, types, weights, region)
                snapshot.append(p)
                want, contributions = self.expected(reader, q)
                if want is None:
                    self.skipped += 1
                else:
                    self.checked += 1
                    assert close(p, want), f"read_pressure({reader!r}, {q!r}) = {p!r}, reference {want!r}"
                if qi > 1 and reader not in (None, "a0"):
                    continue  # explain() is the slow call: every reader under the first two queries only
                e = await self.field.explain(reader, types, weights, region)
                assert close(e.pressure, p), f"explain({reader!r}, {q!r}).pressure {e.pressure!r} != {p!r}"
                assert close(math.fsum(c.contribution for c in e.contributions), e.pressure)
                for c in e.contributions:
                    assert abs(c.deposited_intensity) <= 1.0
                    assert c.weight == (weights or {}).get(c.signal_type, 1.0)
                    assert close(c.contribution, c.weight * c.value)
                if contributions is not None:
                    got = {c.signal_id: c.value for c in e.contributions}
                    assert got.keys() == contributions.keys(), f"explain({reader!r}, {q!r}) signals"
                    for sid, v in contributions.items():
                        assert close(got[sid], v)
            everyone = await self.field.read_pressures(None, types, weights, region)
            assert set(everyone) == self.known_agents
            named = [r for r in READERS if r is not None]
            some = await self.field.read_pressures(named, types, weights, region)
            assert list(some) == named
            for agent in named:
                single = singles[agent]
                assert close(some[agent], single), (
                    f"read_pressures()[{agent!r}] {some[agent]!r} != {single!r}"
                )
                if agent in everyone:
                    assert close(everyone[agent], single)
        for signal in await self.field.read(None):
            assert abs(signal.intensity) <= 1.0
        return snapshot


async def drive(
    config: Config, ops: list[tuple[Any, ...]], qs: list[Query], mode: str
) -> tuple[Harness, list[list[float]]]:
    h = Harness(config, mode)
    snapshots = [await h.readings(qs)]
    for op in ops:
        await h.apply(op)
        snapshots.append(await h.readings(qs))
    return h, snapshots


DEFAULT_QUERY: Query = (None, None, None)
query_lists = st.lists(queries, max_size=2).map(lambda qs: [DEFAULT_QUERY, *qs])
op_lists = st.lists(operations, min_size=4, max_size=30)


# -- 1, 2, 4, 5, 6: random operation sequences against the reference ----------------------


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(all_specs), ops=op_lists, qs=query_lists)
def test_field_matches_reference_model(config: Config, ops: list[tuple[Any, ...]], qs: list[Query]) -> None:
    note(f"config={config!r}")
    note(f"ops={ops!r}")
    note(f"queries={qs!r}")
    h, _ = anyio.run(drive, config, ops, qs, "random")
    for name, n in h.stats.items():
        event(f"{name}: {min(n, 3)}")
    event(f"counts uncertain: {h.counts_uncertain}")
    event(f"readings compared: {round(h.checked / max(1, h.checked + h.skipped), 1)}")
    assume(h.checked > 0)


# -- 3: readings never depend on decay() -----------------------------------------------------


def compare_snapshots(a: list[list[float]], b: list[list[float]], ops: list[tuple[Any, ...]]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for i, (p, q) in enumerate(zip(x, y, strict=True)):
            assert close(p, q), (
                f"after op {step} ({ops[step - 1] if step else 'start'}): reading {i} is {p!r} "
                f"without decay() and {q!r} with decay() after every step"
            )


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(all_specs), ops=op_lists, qs=query_lists)
def test_decay_calls_never_change_a_reading(
    config: Config, ops: list[tuple[Any, ...]], qs: list[Query]
) -> None:
    note(f"config={config!r}")
    note(f"ops={ops!r}")
    _, never = anyio.run(drive, config, ops, qs, "never")
    _, always = anyio.run(drive, config, ops, qs, "always")
    compare_snapshots(never, always, ops)


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs(st.tuples(st.just("exp"), half_lives), by_type=deterministic_specs),
    before=st.lists(operations, max_size=8),
    survivors=st.lists(OPERATIONS["deposit"], min_size=1, max_size=5),
    after=st.lists(operations, max_size=8),
    mode=st.sampled_from(["random", "always"]),
)
def test_readings_survive_accumulator_compaction(
    config: Config, before: list[Any], survivors: list[Any], after: list[Any], mode: str
) -> None:
    """decay() compacts the accumulator table once >= 1024 accumulators are dead: readings must not move."""
    crowd = ("batch", [("a0", "t0", 0.5, None, f"z{i}") for i in range(500)], False)  # ~1500 accumulators
    ops = [*before, crowd, ("advance", 1e9), *survivors, ("decay",), *after]
    note(f"ops={ops!r}")
    anyio.run(drive, config, ops, [DEFAULT_QUERY, (("t0", "t1"), {"t1": -0.5}, "r0")], mode)


# -- regressions, each reduced to a minimal example ------------------------------------------
# A rescale that leaves a signal's evaporation time unchanged (StepDecay: any new |I| >=
# threshold) or returns it to an earlier one (amplify x2 then x0.5) must still retire the
# signal exactly once: its value leaves the accumulators once and decay() counts it once.


async def _amplified_step_signal() -> tuple[float, float, dict[str, float], int, int]:
    clock = ManualClock()
    field = PheromoneField(InMemoryFieldBackend(clock=clock), decay_strategy=StepDecay(1.0))
    signal = await field.deposit("a", "work", 0.5)
    await field.amplify(signal.id, 2.0)  # deposit intensity 0.5 -> 1.0; still evaporates at t=1
    clock.advance(1.0)
    return (
        await field.read_pressure(None),
        await field.read_pressure("b"),
        await field.read_pressures(["b"]),
        await field.decay(),
        await field.signal_count(),
    )


def test_amplified_step_signal_evaporates_exactly_once() -> None:
    assert anyio.run(_amplified_step_signal) == (0.0, 0.0, {"b": 0.0}, 1, 0)


async def _reinforced_task_complete() -> tuple[float, int]:
    clock = ManualClock()
    field = PheromoneField(InMemoryFieldBackend(clock=clock), persistent_ttl=10.0)
    await field.deposit("a", "task_complete", 0.4, region="r")
    assert await field.reinforce("r", factor=2.0) == 1
    clock.advance(10.0)
    return await field.read_pressure("b"), await field.decay()


def test_reinforced_persistent_signal_evaporates_exactly_once() -> None:
    assert anyio.run(_reinforced_task_complete) == (0.0, 1)


async def _amplified_there_and_back() -> tuple[float, float, int]:
    clock = ManualClock()
    field = PheromoneField(InMemoryFieldBackend(clock=clock), decay_strategy=ExponentialDecay(10.0))
    signal = await field.deposit("a", "work", 0.5)
    await field.amplify(signal.id, 2.0)  # 0.5 -> 1.0
    await field.amplify(signal.id, 0.5)  # 1.0 -> 0.5: back to the first evaporation time
    before = await field.read_pressure(None)
    clock.advance(100.0)  # 0.5 * 2**-10 < 0.01: evaporated
    return before, await field.read_pressure(None), await field.decay()


def test_signal_amplified_there_and_back_evaporates_exactly_once() -> None:
    assert anyio.run(_amplified_there_and_back) == (0.5, 0.0, 1)


async def _repeated_type() -> tuple[float, float, dict[str, float]]:
    field = PheromoneField(InMemoryFieldBackend(clock=ManualClock()), decay_strategy=ExponentialDecay(10.0))
    await field.deposit("a", "work", 0.5)
    twice = ["work", "work"]
    return (
        await field.read_pressure("b", signal_types=twice),
        (await field.explain("b", signal_types=twice)).pressure,
        await field.read_pressures(["b"], signal_types=twice),
    )


def test_a_type_listed_twice_counts_once() -> None:
    """signal_types is a set of types: listing one twice counts its signals once, in every reader."""
    assert anyio.run(_repeated_type) == (0.5, 0.5, {"b": 0.5})


async def _refused_deposit() -> tuple[int, dict[str, float]]:
    field = PheromoneField(InMemoryFieldBackend(clock=ManualClock()))
    with pytest.raises(InvalidSignalError):
        await field.deposit("x", "work", 1.5, target_agent_id="y")
    return await field.signal_count(), await field.read_pressures()


def test_a_refused_deposit_leaves_no_trace() -> None:
    """A refused deposit stores nothing and makes none of its agents known to read_pressures()."""
    assert anyio.run(_refused_deposit) == (0, {})


async def _stochastic_two_ways() -> tuple[float, float, int]:
    readings, evaporated = [], 0
    for sweep in (False, True):
        clock = ManualClock()
        field = PheromoneField(
            InMemoryFieldBackend(clock=clock), decay_strategy=StochasticDecay(10.0, noise_factor=0.5, seed=7)
        )
        await field.deposit("a", "work", 0.02)
        clock.advance(20.0)  # the first signal has evaporated (0.02 * 2**-2 * 1.5 < 0.01 at most)
        if sweep:
            evaporated = await field.decay()  # frees row 0, which the next deposit reuses
        with pytest.raises(InvalidSignalError):
            await field.deposit("a", "work", 1.5)  # refused: takes no sequence number
        await field.deposit("a", "work", 1.0)  # the second accepted deposit: salt 1
        clock.advance(10.0)
        readings.append(await field.read_pressure("b"))
    return readings[0], readings[1], evaporated


def test_stochastic_two_ways_setup() -> None:
    without_sweep, with_sweep, evaporated = anyio.run(_stochastic_two_ways)
    assert evaporated == 1
    for reading in (without_sweep, with_sweep):  # each is a legitimate draw: half-life in [5, 15]
        assert 2.0 ** (-10 / 5) <= reading <= 2.0 ** (-10 / 15)


def test_stochastic_readings_never_depend_on_decay_calls() -> None:
    """A stochastic half-life is drawn from the deposit sequence number, not from the row
    the signal happens to reuse: a decay() call in between changes nothing."""
    without_sweep, with_sweep, _ = anyio.run(_stochastic_two_ways)
    assert close(without_sweep, with_sweep), (without_sweep, with_sweep)
    assert close(without_sweep, ref_apply(("sto", 10.0, 0.5, 7), 1.0, 10.0, 1))


# -- 5: amplify / reinforce clamp --------------------------------------------------------------


async def _rescale_once(
    spec: Spec, intensity: float, factor: float, max_amp: float, how: str
) -> tuple[Any, ...]:
    clock = ManualClock()
    field = PheromoneField(
        InMemoryFieldBackend(clock=clock),
        decay_strategy=build(spec),
        max_amplification=max_amp,
        evaporation_threshold=0.01,
    )
    signal = await field.deposit("a", "work", intensity, region="r")
    if how == "amplify":
        result = await field.amplify(signal.id, factor)
        changed = None
    else:
        result = None
        changed = await field.reinforce("r", "work", factor)
    explained = await field.explain(None)
    return result, changed, explained


@settings(max_examples=150, deadline=None, database=None)
@given(
    spec=all_specs,
    intensity=intensities,
    factor=factors,
    max_amp=st.sampled_from([1.0, 1.5, 3.0, 10.0]),
    how=st.sampled_from(["amplify", "reinforce"]),
)
def test_rescaling_caps_the_factor_and_clamps_to_one(
    spec: Spec, intensity: float, factor: float, max_amp: float, how: str
) -> None:
    result, changed, explained = anyio.run(_rescale_once, spec, intensity, factor, max_amp, how)
    visible = abs(intensity) >= 0.01
    if spec[0] == "exp" and abs(intensity) == 0.01:
        visible = False  # exactly at the threshold (the boundary we leave alone)
    want = max(-1.0, min(1.0, intensity * min(factor, max_amp))) if visible else intensity
    gone = visible and abs(want) < 0.01  # rescaled under the threshold: it may read as gone
    if how == "amplify":
        assert (result is None) == (not visible) or gone
        if result is not None:
            assert result.intensity == want  # at age 0 the value is the deposit intensity
    else:
        assert changed == (1 if visible and want != intensity else 0) or gone
    for c in explained.contributions:
        assert abs(c.deposited_intensity) <= 1.0
        assert c.deposited_intensity == want
    if visible and abs(want) >= 0.01:
        assert len(explained.contributions) == 1


# -- decay strategies on their own -----------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    spec=all_specs,
    values=st.lists(st.tuples(intensities, st.integers(0, M64)), min_size=1, max_size=6),
    ages=st.lists(
        st.one_of(st.floats(0.0, 1e5), st.sampled_from([0.0, 1.0, 2.5, 10.0])), min_size=1, max_size=6
    ),
    threshold=st.sampled_from([0.01, 0.05, 0.2, 1e-6]),
)
def test_strategy_closed_form_monotone_and_lifetime(
    spec: Spec, values: list[tuple[float, int]], ages: list[float], threshold: float
) -> None:
    strategy = build(spec)
    ages = sorted(ages)
    for intensity, salt in values:
        n = len(ages)
        got = strategy.apply(np.full(n, intensity), np.array(ages), np.full(n, salt, dtype=np.uint64))
        assert got.dtype == np.float64 and got.shape == (n,)
        for age, v in zip(ages, got.tolist(), strict=True):
            want = ref_apply(spec, intensity, age, salt)
            assert math.isclose(v, want, rel_tol=1e-12, abs_tol=1e-300), (age, v, want)
            assert abs(v) <= abs(intensity)
            assert v * intensity >= 0  # never changes sign
        magnitudes = np.abs(got)
        assert (np.diff(magnitudes) <= 0).all(), f"|value| grew with age: {magnitudes!r}"

        life = float(
            strategy.lifetime(np.array([intensity]), threshold, np.array([salt], dtype=np.uint64))[0]
        )
        assert life >= 0 and math.isfinite(life)

        def at(age: float, intensity: float = intensity, salt: int = salt) -> float:
            one = strategy.apply(np.array([intensity]), np.array([age]), np.array([salt], dtype=np.uint64))
            return abs(float(one[0]))

        if abs(intensity) < threshold:
            assert life == 0.0
            assert at(0.0) < threshold
        else:
            eps = 1e-6 * max(1.0, life)
            assert at(max(0.0, life - eps)) >= threshold, (life, at(max(0.0, life - eps)))
            assert at(life + eps) < threshold, (life, at(life + eps))


@settings(max_examples=100, deadline=None, database=None)
@given(spec=deterministic_specs, intensity=intensities, age=st.floats(0.0, 1e4))
def test_scalar_compute_agrees_with_apply(spec: Spec, intensity: float, age: float) -> None:
    from stigmergy.signal import Signal

    strategy = build(spec)
    signal = Signal(id="abc", signal_type="x", intensity=intensity)
    want = float(strategy.apply(np.array([intensity]), np.array([age]), np.zeros(1, dtype=np.uint64))[0])
    assert strategy.compute(signal, age) == want


@settings(max_examples=200, deadline=None, database=None)
@given(
    h=half_lives,
    noise=st.floats(0.0, 0.99),
    seed=seeds,
    salts=st.lists(st.integers(0, M64), min_size=1, max_size=8),
    intensity=intensities,
    age=st.floats(0.0, 1e4),
)
def test_stochastic_decay_is_deterministic_and_bounded(
    h: float, noise: float, seed: int, salts: list[int], intensity: float, age: float
) -> None:
    one, two = StochasticDecay(h, noise, seed=seed), StochasticDecay(h, noise, seed=seed)
    salt = np.array(salts, dtype=np.uint64)
    n = len(salts)
    a = one.apply(np.full(n, intensity), np.full(n, age), salt)
    b = two.apply(np.full(n, intensity), np.full(n, age), salt)
    assert np.array_equal(a, b)
    assert np.array_equal(one.apply(np.full(n, intensity), np.full(n, age), salt), a)  # no hidden state
    lives = one.half_lives(salt)
    for s, life in zip(salts, lives.tolist(), strict=True):
        assert life == ref_half_life(("sto", h, noise, seed), s)
        assert h * (1 - noise) <= life <= h * (1 + noise)
    slow = abs(intensity) * 2.0 ** (-age / (h * (1 + noise)))
    fast = abs(intensity) * 2.0 ** (-age / (h * (1 - noise)))
    for v in np.abs(a).tolist():
        assert fast * (1 - 1e-12) <= v <= slow * (1 + 1e-12)
    if noise == 0.0:
        assert np.allclose(
            a, ExponentialDecay(h).apply(np.full(n, intensity), np.full(n, age), salt), rtol=1e-15, atol=0
        )
