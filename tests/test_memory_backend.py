"""What only the in-memory backend does: row reuse, the expiry index, accumulator upkeep."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stigmergy import (
    ConfigurationError,
    ExponentialDecay,
    InMemoryFieldBackend,
    LinearDecay,
    ManualClock,
    PheromoneField,
    StochasticDecay,
)
from stigmergy.errors import BackendError, FieldCapacityError, InvalidSignalError

pytestmark = pytest.mark.anyio


def make(clock: ManualClock, **kwargs: object) -> tuple[PheromoneField, InMemoryFieldBackend]:
    backend = InMemoryFieldBackend(clock=clock, initial_capacity=4)
    kwargs.setdefault("decay_strategy", ExponentialDecay(10.0))
    return PheromoneField(backend, **kwargs), backend  # type: ignore[arg-type]


async def test_rows_are_recycled_and_old_ids_die() -> None:
    clock = ManualClock()
    field, _ = make(clock)
    first = [await field.deposit("a", "work", 0.5) for _ in range(3)]
    await field.clear_agent("a")
    again = [await field.deposit("b", "work", 0.25) for _ in range(3)]
    assert {s.id.split("-")[0] for s in first} == {s.id.split("-")[0] for s in again}  # same rows
    assert not {s.id for s in first} & {s.id for s in again}  # new generations
    for s in first:
        assert await field.amplify(s.id, 2.0) is None
    assert math.isclose(await field.read_pressure("z"), 0.75)


async def test_growth_beyond_initial_capacity_keeps_every_signal() -> None:
    clock = ManualClock()
    field, _ = make(clock)
    for i in range(50):
        await field.deposit(f"a{i % 7}", "work", 0.01 * (i + 2), target_agent_id=None if i % 2 else "t")
    await field.deposit_many([f"b{i}" for i in range(100)], "work", np.full(100, 0.1))
    assert await field.signal_count() == 150
    expected_public = sum(0.01 * (i + 2) for i in range(50) if i % 2) + 10.0
    expected_t = expected_public + sum(0.01 * (i + 2) for i in range(50) if not i % 2)
    assert math.isclose(await field.read_pressure("t"), expected_t)


async def test_rescales_leave_stale_expiry_entries_harmless() -> None:
    clock = ManualClock()
    field, _ = make(clock)
    signal = await field.deposit("a", "work", 0.04)  # would evaporate after 20 s
    await field.amplify(signal.id, 3.0)  # 0.12: evaporates after 10*log2(12) = 35.8 s
    await field.amplify(signal.id, 0.5)  # 0.06: after 25.8 s
    clock.advance(25.0)
    assert math.isclose(await field.read_pressure("b"), 0.06 * 2**-2.5)
    clock.advance(1.0)
    assert await field.read_pressure("b") == 0.0
    clock.advance(100.0)
    assert await field.decay() == 1


async def test_accumulators_without_members_are_forgotten() -> None:
    clock = ManualClock()
    field, backend = make(clock)
    await field.deposit_many(
        [f"agent-{i}" for i in range(3000)], "work", 0.5, regions=[f"r{i}" for i in range(3000)]
    )
    keys_before = backend._n_keys
    clock.advance(1000.0)
    assert await field.decay() == 3000
    assert backend._n_keys < keys_before
    await field.deposit("agent-1", "work", 0.5, region="r1")
    assert math.isclose(await field.read_pressure("agent-2"), 0.5)
    assert math.isclose(await field.read_pressure(region="r1"), 0.5)


async def test_generic_strategies_are_evaluated_not_accumulated() -> None:
    clock = ManualClock()
    noisy = StochasticDecay(10.0, noise_factor=0.5, seed=3)
    field, _ = make(clock, decay_by_type={"lin": LinearDecay(0.05), "noisy": noisy})
    await field.deposit("a", "lin", 0.5, target_agent_id="b")
    await field.deposit("a", "noisy", 0.8)
    clock.advance(4.0)
    [stored] = await field.read(signal_types=["noisy"])
    assert 0.8 * 2 ** (-4 / 5) <= stored.intensity <= 0.8 * 2 ** (-4 / 15)
    assert math.isclose(await field.read_pressure("b"), 0.3 + stored.intensity)
    assert math.isclose((await field.read_pressures())["b"], 0.3 + stored.intensity)
    assert math.isclose(await field.read_pressure("c"), stored.intensity)
    clock.advance(6.0)  # linear gone at 9.8 s
    assert math.isclose(await field.read_pressure("b", ["lin"]), 0.0)
    assert await field.decay() == 1


async def test_scalar_only_legacy_strategy_is_adapted() -> None:
    class HalvingEverySecond:  # a stigmergy-scheduler style strategy: compute(signal, elapsed)
        def compute(self, signal: object, elapsed_seconds: float) -> float:
            return float(signal.intensity) * 0.5**elapsed_seconds  # type: ignore[attr-defined]

    clock = ManualClock()
    field, _ = make(clock, decay_strategy=HalvingEverySecond())
    await field.deposit("a", "work", 0.8)
    clock.advance(2.0)
    assert math.isclose(await field.read_pressure("b"), 0.2)


async def test_a_backend_serves_one_field() -> None:
    backend = InMemoryFieldBackend()
    await PheromoneField(backend).read_pressure("a")
    with pytest.raises(ConfigurationError, match="its own backend"):
        await PheromoneField(backend).read_pressure("a")
    with pytest.raises(BackendError, match="not bound"):
        await InMemoryFieldBackend().deposit("a", "t", 0.5, {}, None, None)


async def test_too_many_signal_types_is_a_clear_error() -> None:
    field, backend = make(ManualClock())
    backend._types._limit = 3
    for name in ("a", "b", "c"):
        await field.deposit("x", name, 0.5)
    with pytest.raises(FieldCapacityError, match="at most 3 distinct signal types"):
        await field.deposit("x", "d", 0.5)


async def test_memory_stays_flat_under_churn() -> None:
    clock = ManualClock()
    field, backend = make(clock)
    sizes = []
    for _ in range(20):
        await field.deposit_many([f"a{i}" for i in range(500)], "work", 0.5, target_agent_ids="t")
        clock.advance(100.0)
        await field.decay()
        sizes.append(backend.memory_bytes())
    assert await field.signal_count() == 0
    assert sizes[-1] == sizes[5]  # after warm-up, recycled rows and accumulators: no growth


@pytest.mark.parametrize("size", [2, 8, 9, 40])
async def test_short_batches_stored_signal_by_signal_read_as_long_ones_do(size: int) -> None:
    """Batches of up to 8 take the one-signal path (and short lists are checked without
    numpy); either way a batch reads as the same signals deposited one by one."""
    clock = ManualClock()
    batched, _ = make(clock)
    single, _ = make(clock)
    agents = [f"a{i % 3}" for i in range(size)]
    targets = [None if i % 4 else "a1" for i in range(size)]
    regions = [None if i % 2 else f"r{i % 3}" for i in range(size)]
    values = [round(0.9 - 1.7 * i / size, 3) for i in range(size)]
    assert (
        await batched.deposit_many(agents, "work", values, target_agent_ids=targets, regions=regions) == size
    )
    for agent, value, target, region in zip(agents, values, targets, regions, strict=True):
        await single.deposit(agent, "work", value, target_agent_id=target, region=region)
    clock.advance(3.0)
    for reader in ("a0", "a1", None):
        for region in (None, "r0", "r1", "r2"):
            expected = await single.read_pressure(reader, region=region)
            assert await batched.read_pressure(reader, region=region) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.5, 1.5], r"intensities\[1\] must be a finite number in \[-1, 1\], got 1.5"),
        ([0.5, math.nan], r"intensities\[1\] must be a finite number"),
        ([True, 0.5], r"intensities\[0\] must be a number in \[-1, 1\], got True"),
        ([0.5] * 20 + [-2.0], r"intensities\[20\] must be a finite number"),
    ],
)
async def test_a_bad_intensity_in_a_batch_stores_nothing(values: list[float], message: str) -> None:
    field, _ = make(ManualClock())
    with pytest.raises(InvalidSignalError, match=message):
        await field.deposit_many("a", "work", values)
    assert await field.read_pressure("z") == 0.0
