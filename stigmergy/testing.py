"""The backend conformance suite: the same tests for every field backend.

Anyone writing a backend subclasses :class:`FieldConformance` and provides a
``harness`` fixture that yields a :class:`FieldHarness` (a field on the backend,
plus a way to move the backend's clock). The tests need pytest and anyio's pytest
plugin; they run on asyncio and trio through anyio's ``anyio_backend`` fixture::

    class TestMyBackend(FieldConformance):
        @pytest.fixture
        async def harness(self):
            clock = ManualClock()
            field = PheromoneField(MyBackend(clock=clock), ExponentialDecay(10.0))
            yield FieldHarness(field, clock.advance)
            await field.aclose()

The suite's field must use ``ExponentialDecay(10.0)`` as its default strategy and
the default evaporation threshold (0.01); tests that need other strategies build
their own field with :meth:`FieldHarness.sibling`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from stigmergy.backends.protocol import PressureFloor
from stigmergy.decay import ExponentialDecay, LinearDecay, StepDecay
from stigmergy.errors import InvalidSignalError
from stigmergy.field import PheromoneField

HALF_LIFE = 10.0


@dataclass
class FieldHarness:
    """A field under test and control of its backend's clock.

    ``advance(seconds)`` moves the backend's time forward (it may return an
    awaitable). ``make_field(**field_kwargs)`` builds another field on a fresh
    backend sharing that clock, for tests that need other decay settings.
    """

    field: PheromoneField
    advance_clock: Callable[[float], Any]
    make_field: Callable[..., Awaitable[PheromoneField]] | None = None

    async def advance(self, seconds: float) -> None:
        result = self.advance_clock(seconds)
        if isinstance(result, Awaitable):
            await result

    async def sibling(self, **field_kwargs: Any) -> PheromoneField:
        if self.make_field is None:
            pytest.skip("this harness cannot build fields with other settings")
        return await self.make_field(**field_kwargs)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.anyio
class FieldConformance:
    """Behaviour every backend must show through :class:`PheromoneField`."""

    # -- deposits and visibility -------------------------------------------------------

    async def test_deposit_returns_the_signal_as_stored(self, harness: FieldHarness) -> None:
        field = harness.field
        signal = await field.deposit("a", "work", 0.5, {"task": "t1"}, target_agent_id="b", region="r")
        assert (signal.agent_id, signal.signal_type, signal.intensity) == ("a", "work", 0.5)
        assert (signal.target_agent_id, signal.region, signal.metadata) == ("b", "r", {"task": "t1"})
        [read] = await field.read()
        assert read.id == signal.id and read.metadata == {"task": "t1"}
        assert close(read.intensity, 0.5)
        assert await field.signal_count() == 1

    async def test_untargeted_presses_everyone_but_its_depositor(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.5)
        await field.deposit("c", "idle", 0.1)
        assert close(await field.read_pressure("a"), 0.1)
        assert close(await field.read_pressure("b"), 0.6)
        assert close(await field.read_pressure("never-seen"), 0.6)
        assert close(await field.read_pressure(), 0.6)

    async def test_targeted_presses_only_its_target(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.5, target_agent_id="b")
        await field.deposit("b", "work", 0.25, target_agent_id="b")  # self-targeted: nobody else
        assert close(await field.read_pressure("b"), 0.5)
        assert close(await field.read_pressure("a"), 0.0)
        assert close(await field.read_pressure("c"), 0.0)
        assert close(await field.read_pressure(), 0.75)  # agent None sums every signal

    async def test_region_types_and_weights_filter_a_reading(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.5, region="r1")
        await field.deposit("a", "work", 0.25, region="r2")
        await field.deposit("a", "alarm", -0.5, region="r1")
        assert close(await field.read_pressure(region="r1"), 0.0)
        assert close(await field.read_pressure(region="r2"), 0.25)
        assert close(await field.read_pressure(region="nowhere"), 0.0)
        assert close(await field.read_pressure("b", signal_types=["work"]), 0.75)
        assert close(await field.read_pressure("b", weights={"alarm": 2.0}), -0.25)
        assert close(await field.read_pressure("b", ["work"], {"work": 0.5}, "r1"), 0.25)

    async def test_read_filters_and_orders_strongest_first(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.2)
        await field.deposit("b", "work", -0.9)
        await field.deposit("c", "other", 0.5, target_agent_id="z")
        assert [s.intensity for s in await field.read()] == pytest.approx([-0.9, 0.5, 0.2])
        assert [s.agent_id for s in await field.read("a", exclude_own=True)] == ["b"]
        assert [s.agent_id for s in await field.read(min_intensity=0.3)] == ["b", "c"]
        assert [s.agent_id for s in await field.read(signal_types=["other"])] == ["c"]

    async def test_pressures_of_many_agents_match_single_reads(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.5)
        await field.deposit("b", "work", 0.3, target_agent_id="a")
        await field.deposit("c", "work", -0.2, target_agent_id="b", region="r")
        await harness.advance(3.0)
        everyone = await field.read_pressures()
        assert set(everyone) == {"a", "b", "c"}
        for agent in ("a", "b", "c"):
            assert close(everyone[agent], await field.read_pressure(agent))
        asked = await field.read_pressures(["b", "stranger"], region="r")
        assert close(asked["b"], await field.read_pressure("b", region="r"))
        assert close(asked["stranger"], 0.0)

    async def test_deposit_many_equals_single_deposits(self, harness: FieldHarness) -> None:
        field = harness.field
        count = await field.deposit_many(
            ["a", "b", "c"],
            "work",
            [0.5, -0.25, 1.0],
            target_agent_ids=[None, "a", "a"],
            regions=[None, "r", None],
            metadata=[{"i": 1}, None, {}],
        )
        assert count == 3
        assert close(await field.read_pressure("a"), 0.75)
        assert close(await field.read_pressure("b"), 0.5)
        assert close(await field.read_pressure(region="r"), -0.25)
        assert {s.agent_id: s.metadata for s in await field.read()}["a"] == {"i": 1}

    async def test_a_guarded_batch_is_stored_only_while_its_floors_hold(self, harness: FieldHarness) -> None:
        """Taking a share of a window: spend only if what is spent stays above the floor."""
        field = harness.field

        async def spend(amount: float, at_least: float, region: str | None = "key") -> int:
            floors = [PressureFloor("spend", region, at_least)]
            return await field.deposit_many(
                "gate", ["spend", "mark"], [-amount, 0.5], regions="key", floors=floors
            )

        assert await spend(0.5, -0.6) == 2  # nothing spent yet: 0 >= -0.6
        assert close(await field.read_pressure(signal_types=["spend"], region="key"), -0.5)
        assert await spend(0.5, -0.4) == 0  # -0.5 < -0.4: refused, nothing stored, the mark neither
        assert close(await field.read_pressure(signal_types=["spend"], region="key"), -0.5)
        assert close(await field.read_pressure(signal_types=["mark"]), 0.5)
        await field.deposit("other", "spend", -0.3, target_agent_id="x", region="elsewhere")
        assert await spend(0.1, -0.7, region=None) == 0  # every region, targeted too: -0.8 < -0.7
        assert await spend(0.1, -0.5) == 2  # the floor's own region only: -0.5 >= -0.5
        await harness.advance(HALF_LIFE)  # the spends decay, so the room comes back
        assert await spend(0.1, -0.4) == 2
        with pytest.raises(InvalidSignalError, match="at_least"):
            await field.deposit_many("gate", "spend", -0.1, floors=[PressureFloor("spend", None, math.nan)])
        with pytest.raises(InvalidSignalError, match="a floor's signal_type"):
            await field.deposit_many("gate", "spend", -0.1, floors=[PressureFloor("", None, 0.0)])

    # -- decay --------------------------------------------------------------------------

    async def test_exponential_decay_halves_every_half_life(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.8)
        await harness.advance(HALF_LIFE)
        assert close(await field.read_pressure("b"), 0.4)
        await harness.advance(HALF_LIFE)
        assert close(await field.read_pressure("b"), 0.2)
        [signal] = await field.read()
        assert close(signal.intensity, 0.2)

    async def test_readings_do_not_depend_on_decay_calls(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.9)
        await field.deposit("a", "work", 0.05, target_agent_id="b")
        readings = []
        for _ in range(8):
            await harness.advance(HALF_LIFE / 2)
            before = await field.read_pressure("b")
            for _ in range(3):
                await field.decay()
            readings.append((before, await field.read_pressure("b")))
        assert all(close(x, y) for x, y in readings)
        assert close(readings[-1][0], 0.9 * 0.5**4)  # the small one has evaporated

    async def test_evaporation_counts_what_fell_under_the_threshold(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.02)  # under 0.01 after one half-life
        await field.deposit("a", "work", 0.5)
        assert await field.decay() == 0
        await harness.advance(HALF_LIFE * 1.5)
        assert close(await field.read_pressure("b"), 0.5 * 0.5**1.5)  # gone from readings at once
        assert await field.signal_count() in (1, 2)  # stored until decay() frees it
        assert await field.decay() == 1
        assert await field.signal_count() == 1
        assert await field.decay() == 0
        await harness.advance(HALF_LIFE * 10)
        assert await field.read_pressure("b") == 0.0
        assert await field.decay() == 1
        assert await field.signal_count() == 0

    async def test_decay_strategy_per_signal_type(self, harness: FieldHarness) -> None:
        field = await harness.sibling(
            decay_strategy=ExponentialDecay(HALF_LIFE),
            decay_by_type={"claim": StepDecay(5.0), "budget": LinearDecay(0.1)},
        )
        await field.deposit("a", "claim", 0.5)
        await field.deposit("a", "budget", -0.5)
        await field.deposit("a", "task_complete", 1.0)  # persists: step decay for an hour
        await harness.advance(4.0)
        assert close(await field.read_pressure("b", ["claim"]), 0.5)
        assert close(await field.read_pressure("b", ["budget"]), -0.1)
        await harness.advance(1.0)
        assert close(await field.read_pressure("b", ["claim"]), 0.0)
        assert close(await field.read_pressure("b", ["budget"]), 0.0)
        await harness.advance(3000.0)
        assert close(await field.read_pressure("b"), 1.0)
        assert await field.decay() == 2
        await harness.advance(600.0)
        assert await field.read_pressure("b") == 0.0

    # -- feedback -----------------------------------------------------------------------

    async def test_amplify_rescales_the_deposit_and_clamps(self, harness: FieldHarness) -> None:
        field = harness.field
        signal = await field.deposit("a", "work", 0.4)
        await harness.advance(HALF_LIFE)
        amplified = await field.amplify(signal.id, 2.0)
        assert amplified is not None and close(amplified.intensity, 0.4)  # 0.8 deposited, halved
        assert close(await field.read_pressure("b"), 0.4)
        capped = await field.amplify(signal.id, 100.0)  # capped at 3x and at 1.0
        assert capped is not None and close(capped.intensity, 0.5)
        assert await field.amplify("no-such-signal", 2.0) is None

    async def test_reinforce_a_region(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.2, region="r")
        await field.deposit("a", "idle", 0.2, region="r")
        await field.deposit("a", "work", 0.2, region="elsewhere")
        assert await field.reinforce("r", "work", 1.5) == 1
        assert close(await field.read_pressure(region="r"), 0.5)
        assert await field.reinforce("r", factor=10.0) == 2
        assert close(await field.read_pressure(region="r"), 0.9 + 0.6)

    async def test_inhibit_deposits_repulsion(self, harness: FieldHarness) -> None:
        field = harness.field
        signal = await field.inhibit("r", intensity=-0.6, metadata={"error": "boom"})
        assert signal.signal_type == "inhibition" and signal.intensity == -0.6
        assert close(await field.read_pressure("worker", region="r"), -0.6)
        with pytest.raises(InvalidSignalError, match="negative"):
            await field.inhibit("r", intensity=0.6)

    async def test_gradient_points_to_higher_pressure(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.2, region="here")
        await field.deposit("a", "work", 0.7, region="there")
        gradient = await field.gradient("here", ["there", "empty"])
        assert close(gradient["there"], 0.5) and close(gradient["empty"], -0.2)

    async def test_explain_lists_every_contribution(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.8)
        await field.deposit("c", "alarm", -0.3, target_agent_id="b")
        await field.deposit("b", "work", 0.9)  # its own: not part of b's pressure
        await harness.advance(HALF_LIFE)
        explanation = await field.explain("b", weights={"alarm": 2.0})
        assert close(explanation.pressure, await field.read_pressure("b", weights={"alarm": 2.0}))
        by_agent = {c.agent_id: c for c in explanation.contributions}
        assert set(by_agent) == {"a", "c"}
        assert close(by_agent["a"].value, 0.4) and by_agent["a"].deposited_intensity == 0.8
        assert close(by_agent["c"].contribution, -0.3)
        expected_end = by_agent["a"].deposited_at + HALF_LIFE * math.log2(0.8 / 0.01)
        assert math.isclose(by_agent["a"].evaporates_at, expected_end, rel_tol=1e-6)
        assert "evaporates in" in str(explanation)

    # -- removal ------------------------------------------------------------------------

    async def test_clear_agent_and_region(self, harness: FieldHarness) -> None:
        field = harness.field
        await field.deposit("a", "work", 0.5, region="r")
        await field.deposit("a", "work", 0.25)
        await field.deposit("b", "work", 0.125, region="r")
        assert await field.clear_agent("a") == 2
        assert close(await field.read_pressure("z"), 0.125)
        assert await field.clear_region("r") == 1
        assert await field.read_pressure("z") == 0.0
        assert await field.signal_count() == 0
        assert await field.clear_agent("a") == 0
        signal = await field.deposit("a", "work", 0.5)  # storage is reused cleanly
        assert close(await field.read_pressure("z"), 0.5)
        assert (await field.read())[0].id == signal.id

    async def test_removed_signal_ids_stay_dead(self, harness: FieldHarness) -> None:
        field = harness.field
        old = await field.deposit("a", "work", 0.5)
        await field.clear_agent("a")
        new = await field.deposit("b", "work", 0.5)
        assert old.id != new.id
        assert await field.amplify(old.id, 2.0) is None
        assert close(await field.read_pressure("z"), 0.5)

    # -- bad input ----------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("kwargs", "fragment"),
        [
            ({"intensity": math.nan}, "finite"),
            ({"intensity": math.inf}, "finite"),
            ({"intensity": 1.5}, "[-1, 1]"),
            ({"intensity": -1.0001}, "[-1, 1]"),
            ({"intensity": "high"}, "number"),
            ({"signal_type": ""}, "signal_type"),
            ({"agent_id": ""}, "agent_id"),
            ({"region": ""}, "region"),
            ({"metadata": {"when": object()}}, "JSON"),
            ({"metadata": {"x": math.nan}}, "JSON"),
        ],
    )
    async def test_bad_deposits_are_refused_and_nothing_is_stored(
        self, harness: FieldHarness, kwargs: dict[str, Any], fragment: str
    ) -> None:
        arguments: dict[str, Any] = {"agent_id": "a", "signal_type": "work", "intensity": 0.5}
        arguments.update(kwargs)
        with pytest.raises(InvalidSignalError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            await harness.field.deposit(**arguments)
        assert await harness.field.signal_count() == 0

    async def test_bad_batches_store_nothing(self, harness: FieldHarness) -> None:
        field = harness.field
        with pytest.raises(InvalidSignalError, match=r"intensities\[1\]"):
            await field.deposit_many(["a", "b"], "work", [0.5, math.nan])
        with pytest.raises(InvalidSignalError, match="agent_ids has 1 entries, other columns 2"):
            await field.deposit_many(["a"], "work", [0.5, 0.5])
        with pytest.raises(InvalidSignalError, match="signal_type"):
            await field.deposit_many("a", ["work", ""], [0.5, 0.5])
        with pytest.raises(InvalidSignalError, match="factor"):
            await field.reinforce("r", factor=-1.0)
        with pytest.raises(InvalidSignalError, match="weight"):
            await field.read_pressure("a", weights={"work": math.nan})
        assert await field.signal_count() == 0
