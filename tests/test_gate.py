"""The admission gate: pacing from windows, holds, fairness, caps, budgets, explanations.

A ManualClock drives the gate and its field; requests are tasks that wait in the
gate while the test moves time. Nothing sleeps for correctness.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

from stigmergy import ManualClock, PheromoneField
from stigmergy import gate as gate_module
from stigmergy.budgets import TokenBudgets
from stigmergy.errors import (
    AdmissionTimeoutError,
    BudgetExceededError,
    ConfigurationError,
    QuotaExhaustedError,
)
from stigmergy.gate import FAIRNESS_WINDOW, Cost, Gate, Route
from stigmergy.ratelimits import Quota, RateLimitInfo

pytestmark = pytest.mark.anyio

EPOCH = 1_800_000_000.0
ROUTE = Route("https://api.example", "k1", "model-a")


def gate_at(clock: ManualClock, **settings: object) -> Gate:
    return Gate(clock=clock, wall_clock=lambda: EPOCH + clock(), **settings)  # type: ignore[arg-type]


def info(status: int, outcome: str, *quotas: Quota, retry_at: float | None = None) -> RateLimitInfo:
    return RateLimitInfo("openai", status, outcome, tuple(quotas), retry_at)  # type: ignore[arg-type]


async def settle() -> None:
    await anyio.wait_all_tasks_blocked()


async def run_until(
    clock: ManualClock, done: Callable[[], bool], step: float = 0.05, limit: float = 1e4
) -> None:
    """Move time in small steps until ``done()`` (or fail after ``limit`` seconds)."""
    await settle()
    while not done():
        assert clock() < limit, "nothing happened for too long"
        clock.advance(step)
        await settle()


async def test_without_known_limits_requests_go_at_once() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    async with gate.admit("a", ROUTE) as ticket:
        assert ticket.waited == 0 and ticket.pressure == pytest.approx(0.5)
    assert gate.channels()[ROUTE]["in_flight"] == 0


async def test_a_window_paces_requests_at_the_limit_after_the_burst_it_allows() -> None:
    clock = ManualClock()
    gate = gate_at(clock, limits={"rpm": 60})
    admitted: list[float] = []

    async def request(i: int) -> None:
        async with gate.admit(f"agent-{i}", ROUTE):
            admitted.append(clock())

    async with anyio.create_task_group() as tg:
        for i in range(90):
            tg.start_soon(request, i)
        await run_until(clock, lambda: len(admitted) == 90)
    assert admitted[:60] == [0.0] * 60  # a full window allows a burst of its size
    gaps = [b - a for a, b in itertools.pairwise(admitted[60:])]
    assert all(0.95 <= g <= 1.1 for g in gaps)  # then one per second: 60 per minute
    level, last = 60.0, 0.0  # the upstream's token bucket: 60 requests, refilled at 1/s
    for t in admitted:
        level = min(60.0, level + (t - last))
        last, level = t, level - 1
        assert level >= -1e-9, f"the upstream would refuse the request at t={t}"


async def test_a_hold_admits_nothing_until_it_lifts_and_the_first_waiter_goes_then() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    await gate.observe(ROUTE, info(429, "quota", retry_at=EPOCH + 7.5))
    admitted: list[float] = []

    async def request() -> None:
        async with gate.admit("a", ROUTE):
            admitted.append(clock())

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await run_until(clock, lambda: bool(admitted), step=0.5)
    assert admitted == [7.5]
    explanation = await gate.explain(ROUTE)
    assert explanation.reading.hold == 0


async def test_an_empty_days_quota_holds_until_its_reset_an_empty_minute_only_fills_the_window() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    await gate.observe(ROUTE, info(200, "ok", Quota("rpd", 1000, 0, EPOCH + 12.0)))
    explanation = await gate.explain(ROUTE)
    assert explanation.reading.hold == pytest.approx(12.0)
    assert explanation.reading.fill["rpd"] == pytest.approx(1.0)
    assert "held for 12.00s more" in str(explanation)
    other = Route("https://api.example", "k2")
    await gate.observe(other, info(200, "ok", Quota("rpm", 100, 0, EPOCH + 60.0)))  # refills continuously
    reading = await gate.read(other)
    assert reading.hold == 0 and reading.fill["rpm"] == pytest.approx(1.0)
    assert (await gate.explain(other)).next_admission_in is None


async def test_headers_top_up_the_window_when_the_upstream_counts_more_than_we_did() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    await gate.observe(ROUTE, info(200, "ok", Quota("rpm", 100, 40, EPOCH + 30.0)))
    reading = await gate.read(ROUTE)
    assert reading.fill == {"rpm": pytest.approx(0.6)}  # another client used 60 of 100


async def test_overload_holds_the_whole_upstream_and_backs_off_exponentially() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    other = Route(ROUTE.upstream, "k2", "model-b")
    await gate.observe(ROUTE, info(529, "overloaded"))
    assert (await gate.read(other)).hold == pytest.approx(1.0)
    clock.advance(1.0)
    await gate.observe(ROUTE, info(529, "overloaded"))
    assert (await gate.read(other)).hold == pytest.approx(2.0)


async def test_a_per_day_quota_fails_fast_without_waiting() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    await gate.observe(ROUTE, info(429, "daily_quota", retry_at=EPOCH + 3600))
    with pytest.raises(QuotaExhaustedError, match="quota is exhausted") as caught:
        await gate.acquire("a", ROUTE)
    assert caught.value.until == EPOCH + 3600


async def test_under_saturation_no_agent_waits_more_than_twice_its_fair_share() -> None:
    clock = ManualClock()
    agents, rate = 50, 50 / 60  # 50 agents on a 50 RPM window
    gate = gate_at(clock, limits={"rpm": 50})
    waits: dict[str, list[float]] = {f"agent-{i}": [] for i in range(agents)}

    async def agent(name: str) -> None:
        for _ in range(3):
            async with gate.admit(name, ROUTE) as ticket:
                waits[name].append(ticket.waited)

    async with anyio.create_task_group() as tg:
        for name in waits:
            tg.start_soon(agent, name)
        await run_until(clock, lambda: all(len(w) == 3 for w in waits.values()), step=0.25)
    fair_share = agents / rate
    assert max(max(w) for w in waits.values()) <= 2 * fair_share
    assert max(max(w) for w in waits.values()) >= 0.5 * fair_share  # it was saturated


async def test_priority_goes_first_but_waiting_catches_up() -> None:
    clock = ManualClock()
    gate = gate_at(clock, limits={"rpm": 1}, aging_rate=0.1)
    order: list[str] = []
    async with gate.admit("warmup", ROUTE):  # fills the one-request window
        pass

    async def request(name: str, priority: float) -> None:
        async with gate.admit(name, ROUTE, priority):
            order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "old-low", 0.2)
        await settle()
        clock.advance(1.0)
        tg.start_soon(request, "new-high", 0.9)
        await run_until(clock, lambda: len(order) == 2, step=1.0)
    assert order == ["new-high", "old-low"]  # 0.9 beats 0.2 + 0.1 * 1 s of waiting


async def history(gate: Gate, clock: ManualClock, agents: str, route: Route = ROUTE) -> None:
    """Admit one request of each agent named in ``agents`` in turn, a gate second apart."""
    for name in agents:
        gate.release(await gate.acquire(name, route))
        clock.advance(1.0)


async def contest(
    gate: Gate, clock: ManualClock, arrivals: list[tuple[str, float]], route: Route = ROUTE
) -> dict[str, float]:
    """With the one in-flight place taken, ``(agent, seconds later)`` queue up in turn; then the
    place frees and each admitted request releases at once. Each agent's credit, in the order
    they were admitted."""
    blocker = await gate.acquire("blocker", route)
    credits: dict[str, float] = {}

    async def request(name: str) -> None:
        async with gate.admit(name, route) as ticket:
            credits[name] = ticket.credit

    async with anyio.create_task_group() as tg:
        for name, later in arrivals:
            clock.advance(later)
            tg.start_soon(request, name)
            await settle()
        gate.release(blocker)
        await run_until(clock, lambda: len(credits) == len(arrivals))
    return credits


async def test_an_agent_behind_its_share_goes_ahead_of_agents_served_meanwhile() -> None:
    """Agent a is away on a slow call while b and c are served four times each; back, it
    queues after c, yet goes first: it is owed the time of a round (waiting stays FIFO with
    fairness off, see test_gate_ablation)."""
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1)
    await history(gate, clock, "abcbcbcbc")  # t = 0..8: a once, b and c four times each
    credits = await contest(gate, clock, [("c", 1.0), ("a", 1.0)])  # the blocker at 9, c at 10, a at 11
    assert list(credits) == ["a", "c"]
    # at 11: 10 admissions of 4 agents (mean 2.5); a is 1.5 behind (counted as 1), c ahead.
    # A round: 4 agents, the last admissions 1 s apart, 4 s
    assert credits == {"a": pytest.approx(4.0), "c": 0.0}


async def test_fairness_credit_is_at_most_one_round_so_a_long_waiter_still_goes_first() -> None:
    """A newcomer is owed one round (one admission per agent at the recent pace: 3 agents
    1 s apart, 3 s), no more: c, queued 10 s before it, goes first all the same."""
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1)
    await history(gate, clock, "bcbcbc")  # t = 0..5
    credits = await contest(gate, clock, [("c", 0.0), ("newcomer", 10.0)])  # the blocker and c at 6
    assert list(credits) == ["c", "newcomer"]
    assert credits == {"c": 0.0, "newcomer": pytest.approx(3.0)}  # idle time since is no part of a round


async def test_fairness_forgets_admissions_older_than_its_window() -> None:
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1)
    await history(gate, clock, "abbbbbbb")
    clock.advance(FAIRNESS_WINDOW + 1.0)
    ticket = await gate.acquire("a", ROUTE)
    assert ticket.credit == 0.0  # the window is empty: nobody is behind
    gate.release(ticket)
    ticket = await gate.acquire("new", ROUTE)
    assert ticket.credit == 0.0  # one admission in the window gives no pace yet
    gate.release(ticket)


async def test_fairness_keeps_at_most_its_log_of_admissions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy channel's log is capped (the oldest admissions go first), its counts with it."""
    monkeypatch.setattr(gate_module, "FAIRNESS_LOG", 5)
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=1)
    await history(gate, clock, "aaaaabbb")  # within the window, but only the last five stay
    ticket = await gate.acquire("c", ROUTE)
    gate.release(ticket)
    (service,) = (channel.service for channel in gate._channels.values())
    assert [agent for _, agent in service.log] == ["a", "a", "b", "b", "b", "c"][-5:]
    assert service.counts == {"a": 1, "b": 3, "c": 1}


async def test_max_in_flight_is_a_hard_cap_and_a_release_admits_the_next() -> None:
    clock = ManualClock()
    gate = gate_at(clock, max_in_flight=2)
    first, second = await gate.acquire("a", ROUTE), await gate.acquire("b", ROUTE)
    admitted: list[str] = []

    async def third() -> None:
        async with gate.admit("c", ROUTE):
            admitted.append("c")

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await settle()
        assert admitted == [] and (await gate.explain(ROUTE)).waiting == 1
        gate.release(first)
        await settle()
        assert admitted == ["c"]
    gate.release(second)


async def test_max_wait_raises_a_typed_timeout_that_says_why() -> None:
    gate = Gate(max_wait=0.01)
    await gate.hold(ROUTE, 30.0)
    with pytest.raises(AdmissionTimeoutError, match=r"waited more than 0\.01s"):
        await gate.acquire("a", ROUTE)
    assert gate.channels()[ROUTE]["waiting"] == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    clock = ManualClock()
    gate = gate_at(clock)
    await gate.hold(ROUTE, 10.0)
    with anyio.move_on_after(0.01):
        await gate.acquire("a", ROUTE)
    assert gate.channels()[ROUTE] == {"waiting": 0, "in_flight": 0, "limits": {}}


async def test_budgets_reserve_before_and_settle_after() -> None:
    warnings: list[tuple[str, float, float]] = []
    budgets = TokenBudgets(per_agent=1000, total=1500, warn_at=0.5, on_warning=lambda *w: warnings.append(w))
    gate = Gate(budgets=budgets)
    ticket = await gate.acquire("a", ROUTE, cost=Cost(200, 600))
    with pytest.raises(BudgetExceededError, match="agent 'a'"):
        await gate.acquire("a", ROUTE, cost=Cost(100, 200))  # 800 reserved + 300 > 1000
    await gate.finish(ticket, input_tokens=150, output_tokens=450, ttft=None)
    assert budgets.snapshot()["a"] == {"limit": 1000, "spent": 600, "reserved": 0}
    assert warnings == [("a", 600, 1000)]
    second = await gate.acquire("b", ROUTE, cost=Cost(100, 700))
    with pytest.raises(BudgetExceededError, match="global budget"):
        await gate.acquire("c", ROUTE, cost=Cost(100, 100))  # 600 spent + 800 reserved + 200 > 1500
    gate.release(second)


async def test_finish_refunds_the_unused_part_of_the_token_estimate() -> None:
    clock = ManualClock()
    gate = gate_at(clock, limits={"tpm": 1000})
    ticket = await gate.acquire("a", ROUTE, cost=Cost(100, 500))
    assert (await gate.read(ROUTE)).fill["tpm"] == pytest.approx(0.6)
    await gate.finish(ticket, input_tokens=100, output_tokens=50, ttft=0.2)
    assert (await gate.read(ROUTE)).fill["tpm"] == pytest.approx(0.15)


async def test_slow_first_tokens_press_back_softly() -> None:
    clock = ManualClock()
    gate = gate_at(clock, latency_target=1.0)
    ticket = await gate.acquire("a", ROUTE)
    await gate.finish(ticket, input_tokens=1, output_tokens=1, ttft=3.0)
    assert (await gate.read(ROUTE)).soft == pytest.approx(-1.0)
    clock.advance(5.0)
    assert (await gate.read(ROUTE)).soft == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"aging_rate": 0}, "aging_rate"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"limits": {"rpx": 5}}, "rpx"),
    ],
)
def test_bad_settings_are_configuration_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Gate(**settings)  # type: ignore[arg-type]


async def test_tiny_spends_still_count_and_a_field_that_would_drop_them_is_refused() -> None:
    clock = ManualClock()
    gate = gate_at(clock, limits={"rpm": 10_000})
    for _ in range(100):
        gate.release(await gate.acquire("a", ROUTE))
    assert (await gate.read(ROUTE)).fill["rpm"] == pytest.approx(0.01)
    with pytest.raises(ConfigurationError, match="gate_field"):
        Gate(PheromoneField())


def test_cost_per_dimension() -> None:
    cost = Cost(100, 50)
    assert [cost.of(d) for d in ("rpm", "rpd", "tpm", "itpm", "otpm")] == [1, 1, 150, 100, 50]
    assert math.isclose(Cost().of("tpm"), 0)


async def test_headers_refund_a_request_window_down_to_the_upstreams_count_plus_our_in_flight() -> None:
    """A window decays slower than a bucket refills while it is not full; the upstream's count wins,
    but never below what it could hold once the requests we have in flight reach it."""
    clock = ManualClock()
    gate = gate_at(clock, limits={"rpm": 60, "tpm": 1000})
    tickets = [await gate.acquire("a", ROUTE, cost=Cost(10, 10)) for _ in range(30)]
    for ticket in tickets[2:]:
        gate.release(ticket)  # two stay in flight
    assert (await gate.read(ROUTE)).fill["rpm"] == pytest.approx(0.5)
    await gate.observe(ROUTE, info(200, "ok", Quota("rpm", 60, 50, None), Quota("tpm", 1000, 1000, None)))
    fill = (await gate.read(ROUTE)).fill
    assert fill["rpm"] == pytest.approx((10 + 2) / 60)  # its count, plus our two in flight
    assert fill["tpm"] == pytest.approx(0.6)  # token windows stay conservative


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_gates_sharing_a_redis_field_never_both_take_the_last_room(redis_url: str) -> None:
    """Two processes' gates read the same empty window at the same moment; both would admit. The
    spend is guarded in Redis, so exactly one takes the one request a 1 RPM window holds."""
    from redis.asyncio import Redis

    from stigmergy.backends.redis_backend import RedisFieldBackend
    from stigmergy.gate import gate_field

    client, prefix = Redis.from_url(redis_url), f"gates-{uuid.uuid4().hex}"
    gates = [
        Gate(gate_field(RedisFieldBackend(client, prefix)), limits={"rpm": 1}, aging_rate=10.0)
        for _ in range(2)
    ]
    route, admitted = Route("https://api.example.com", "k"), []

    async def ask(gate: Gate) -> None:
        admitted.append(await gate.acquire("agent", route, priority=1.0))

    async with anyio.create_task_group() as tg:
        for gate in gates:
            tg.start_soon(ask, gate)
        await anyio.sleep(1.0)  # the other waits for the window: about a minute
        tg.cancel_scope.cancel()
    assert len(admitted) == 1
    await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_a_redis_field_arrivals_and_cancellations_during_a_pump_lose_no_request(
    redis_url: str,
) -> None:
    """Reading and spending in Redis suspend the pumping waiter: newcomers with a higher
    priority and waiters that give up meanwhile must neither be dropped nor counted in flight."""
    from redis.asyncio import Redis

    from stigmergy.backends.redis_backend import RedisFieldBackend
    from stigmergy.gate import gate_field

    client = Redis.from_url(redis_url)
    gate = Gate(gate_field(RedisFieldBackend(client, f"pump-{uuid.uuid4().hex}")), limits={"rpm": 100_000})
    route, admitted = Route("https://api.example.com", "k"), []

    async def ask(n: int, scope: anyio.CancelScope) -> None:
        with scope:
            ticket = await gate.acquire(f"agent-{n}", route, priority=0.5 + n / 100)
            admitted.append(n)
            gate.release(ticket)

    scopes = [anyio.CancelScope() for _ in range(60)]
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for n, scope in enumerate(scopes):
                tg.start_soon(ask, n, scope)
                await anyio.lowlevel.checkpoint()
                if n % 3 == 2:
                    scopes[n - 1].cancel()  # gives up while others are being pumped
    cancelled = {n for n, scope in enumerate(scopes) if scope.cancel_called}
    assert sorted(admitted + [n for n in cancelled if n not in admitted]) == list(range(60))
    assert len(admitted) == len(set(admitted))
    assert gate.channels()[route]["in_flight"] == 0 and gate.channels()[route]["waiting"] == 0
    await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fairness_orders_waiters_on_a_redis_field_too(redis_url: str) -> None:
    """The admissions behind the credit are this process's own: the field (here Redis) only
    holds the spends and holds, so waiters go in the same order as on an in-memory field."""
    from redis.asyncio import Redis

    from stigmergy.backends.redis_backend import RedisFieldBackend
    from stigmergy.gate import gate_field

    client, clock = Redis.from_url(redis_url), ManualClock()
    field = gate_field(RedisFieldBackend(client, f"fair-{uuid.uuid4().hex}"))
    gate = Gate(field, clock=clock, max_in_flight=1)
    await history(gate, clock, "abcbcbcbc")
    with anyio.fail_after(10):
        credits = await contest(gate, clock, [("c", 1.0), ("a", 1.0)])
    assert list(credits) == ["a", "c"]
    await client.aclose()
