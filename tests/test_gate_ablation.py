"""``Gate(disable=...)``: each switch really turns its primitive off (and only with the switch).

Each test runs the same situation with the primitive on and off and asserts on what the
gate does, on a ManualClock: nothing sleeps.
"""

from __future__ import annotations

import anyio
import pytest
from test_gate import EPOCH, ROUTE, contest, gate_at, history, info, run_until, settle

from stigmergy import ManualClock
from stigmergy.budgets import TokenBudgets
from stigmergy.errors import BudgetExceededError, ConfigurationError
from stigmergy.gate import PRIMITIVES, Cost, Gate
from stigmergy.ratelimits import Quota

pytestmark = pytest.mark.anyio


async def first_admission(
    gate: Gate, clock: ManualClock, priority: float = 0.5, limit: float = 60.0
) -> float:
    """Gate seconds until one request is admitted (inf if not within ``limit``)."""
    admitted: list[float] = []

    async def request() -> None:
        async with gate.admit("a", ROUTE, priority):
            admitted.append(clock())

    start = clock()
    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await run_until(clock, lambda: bool(admitted) or clock() - start >= limit, step=0.25)
        tg.cancel_scope.cancel()
    return admitted[0] - start if admitted else float("inf")


@pytest.mark.parametrize("disable", [{"nonsense"}, "aging", ["rate_limits", "retries"]])
def test_unknown_names_are_refused_naming_the_valid_ones(disable: object) -> None:
    with pytest.raises(ConfigurationError, match="rate_limits, backoff, latency"):
        Gate(disable=disable)  # type: ignore[arg-type]


def test_every_primitive_has_a_description() -> None:
    assert set(PRIMITIVES) == {
        "rate_limits",
        "backoff",
        "latency",
        "occupancy",
        "budgets",
        "aging",
        "fairness",
    }
    Gate(disable=PRIMITIVES)  # all at once is allowed


@pytest.mark.parametrize("off", [False, True])
async def test_rate_limits_off_learns_no_window(off: bool) -> None:
    clock = ManualClock()
    gate = gate_at(clock, disable={"rate_limits"} if off else ())
    await gate.observe(ROUTE, info(200, "ok", Quota("rpm", 60, 0, EPOCH + 60.0)))  # the window is full
    assert (await gate.read(ROUTE)).fill == ({} if off else {"rpm": pytest.approx(1.0)})
    assert await first_admission(gate, clock) == (0.0 if off else pytest.approx(1.0, abs=0.3))


@pytest.mark.parametrize("off", [False, True])
async def test_backoff_off_ignores_retry_after_overloads_and_errors(off: bool) -> None:
    clock = ManualClock()
    gate = gate_at(clock, disable={"backoff"} if off else ())
    await gate.observe(ROUTE, info(429, "quota", retry_at=EPOCH + 30.0))
    await gate.observe(ROUTE, info(529, "overloaded"))
    await gate.report_error(ROUTE)
    assert (await gate.read(ROUTE)).hold == (0.0 if off else pytest.approx(30.0))
    waited = await first_admission(gate, clock)  # off: only the error's soft pressure, aged away in 3 s
    assert waited < 3.1 if off else waited == pytest.approx(30.0, abs=0.3)


@pytest.mark.parametrize("off", [False, True])
async def test_latency_off_deposits_no_soft_pressure(off: bool) -> None:
    clock = ManualClock()
    gate = gate_at(clock, disable={"latency"} if off else (), latency_target=1.0)
    ticket = await gate.acquire("a", ROUTE)
    await gate.finish(ticket, input_tokens=1, output_tokens=1, ttft=5.0)  # four times the target
    await gate.observe(ROUTE, info(502, "transient"))
    soft = (await gate.read(ROUTE)).soft
    assert soft == 0.0 if off else soft < -0.5


@pytest.mark.parametrize("off", [False, True])
async def test_occupancy_off_ignores_max_in_flight(off: bool) -> None:
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1, disable={"occupancy"} if off else ())
    held = await gate.acquire("a", ROUTE)
    assert await first_admission(gate, clock, limit=5.0) == (0.0 if off else float("inf"))
    gate.release(held)


@pytest.mark.parametrize("off", [False, True])
async def test_budgets_off_reserves_and_refuses_nothing(off: bool) -> None:
    clock = ManualClock()
    budgets = TokenBudgets(per_agent=10)
    gate = gate_at(clock, budgets=budgets, disable={"budgets"} if off else ())
    if off:
        ticket = await gate.acquire("a", ROUTE, cost=Cost(100, 100))
        gate.release(ticket, spent_tokens=200)
        assert budgets.snapshot() == {} or all(v["spent"] == 0 for v in budgets.snapshot().values())
    else:
        with pytest.raises(BudgetExceededError):
            await gate.acquire("a", ROUTE, cost=Cost(100, 100))


@pytest.mark.parametrize("off", [False, True])
async def test_aging_off_leaves_a_waiter_under_the_threshold_waiting(off: bool) -> None:
    """Priority 0.4 under threshold 0.5: aging (0.1/s) lets it through after 1 s; without, never."""
    clock = ManualClock()
    gate = gate_at(clock, disable={"aging"} if off else ())
    waited = await first_admission(gate, clock, priority=0.4, limit=30.0)
    assert waited == (float("inf") if off else pytest.approx(1.0, abs=0.3))
    await settle()


@pytest.mark.parametrize("off", [False, True])
async def test_fairness_off_queues_an_agent_behind_its_share_first_come_first_served(off: bool) -> None:
    """a was served once while b and c were served four times each: it goes ahead of c,
    who queued a second before it; without fairness, c goes first and a is owed nothing."""
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1, disable={"fairness"} if off else ())
    await history(gate, clock, "abcbcbcbc")
    credits = await contest(gate, clock, [("c", 1.0), ("a", 1.0)])
    assert list(credits) == (["c", "a"] if off else ["a", "c"])
    assert (credits["a"] == 0.0) == off
