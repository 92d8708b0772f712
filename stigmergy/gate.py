"""The admission gate: a request is forwarded when its pressure crosses the threshold.

Everything the upstream says lands in the field at the request's channel (region
``upstream|key|model``, or ``upstream|*`` for the whole upstream):

- ``spend_<dim>``: each admitted request spends ``cost / limit`` of a window
  (rpm, tpm, itpm, otpm per minute; rpd per day), decaying exponentially with the
  window as mean lifetime. Their sum is how full the window is; it never reads
  lower than a token bucket of the same size would, and the moment it falls low
  enough for the next request is known in closed form. The rate-limit headers
  top it up when the upstream counts more than we did (other clients on the key), and
  on an in-memory field lower a request window to its count plus our requests in flight.
- ``hold``: a deadline (429 retry-after, an empty window until its reset, a 529's
  back-off, a 5xx's short pause), as a linear decay that evaporates exactly then.
- ``latency`` (time to first token over the target), ``success`` and ``error``:
  soft, short-lived pressure that slows admissions when the upstream strains.

A waiting request's pressure is ``priority + aging_rate * (waited + credit) + soft``;
it is admitted when that reaches ``threshold``, no hold is active and the windows have
room for its cost. Waiters of one channel are ordered by that pressure (FIFO among
equals), so under saturation every agent's next request waits about
``agents / rate``. ``credit`` (fairness) is what an agent behind its share of the
channel's recent admissions is owed: an agent whose calls are sequential and drew
slow answers would otherwise queue behind everyone for each of its remaining calls
and end last. Sharing the field (Redis) shares spends and holds between processes.
In-flight counts, ``max_in_flight`` and the admissions behind ``credit`` are this
process's own (as its queue is).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.backends.protocol import FieldBackend, PressureFloor
from stigmergy.budgets import Reservation, TokenBudgets
from stigmergy.clock import AcceleratedClock, Clock, ManualClock, monotonic_clock
from stigmergy.decay import ExponentialDecay, LinearDecay
from stigmergy.errors import AdmissionTimeoutError, ConfigurationError, QuotaExhaustedError
from stigmergy.field import PheromoneField
from stigmergy.ratelimits import RateLimitInfo

logger = logging.getLogger(__name__)

#: Seconds per window of each dimension.
WINDOWS = {"rpm": 60.0, "tpm": 60.0, "itpm": 60.0, "otpm": 60.0, "rpd": 86400.0, "tpd": 86400.0}
#: Signals under this no longer count: far below any spend (1 token of a 10M TPM window is 1e-7).
EVAPORATION_THRESHOLD = 1e-9
HOLD = "hold"
HOLD_RATE = 1.0 / 60.0  # a hold loses 1/60 of intensity per second: one signal holds up to ~59 s
SOFT = ("latency", "success", "error")
GATE_AGENT = "stigmergy.gate"
#: What ``Gate(disable=...)`` can switch off, one primitive at a time, to measure what each
#: contributes (``bench/scenarios.py --ablation``). Retries live in the transport and the
#: proxy (``max_retries=0``).
PRIMITIVES: dict[str, str] = {
    "rate_limits": "rate-limit windows: no limits learned from headers or given, no spends",
    "backoff": "holds after 429, 529/503 overloads, 5xx and connection errors",
    "latency": "soft pressure: latency, success and error signals",
    "occupancy": "the max_in_flight cap",
    "budgets": "token budgets: no reservations, no refusals",
    "aging": "waiting adds no pressure; a waiter under the threshold re-checks every second",
    "fairness": "no credit for agents behind their share of recent admissions: waiters go FIFO",
}
#: Gate seconds between re-checks of a waiter that only decaying soft pressure can let through.
RECHECK = 1.0
#: Gate seconds of admissions that fairness counts: five rate-limit windows, so that what an
#: agent fell behind early in a batch of calls is still owed at its end (over one window,
#: an agent whose recent calls happened to be quick looked ahead and was sent to the back).
FAIRNESS_WINDOW = 300.0
#: At most this many admissions are kept per channel (a proxy at thousands of requests/s
#: would otherwise keep hundreds of thousands): at such a pace the window is seconds long,
#: and nobody waits long enough for fairness to matter.
FAIRNESS_LOG = 10_000


def _room(share: float) -> float:
    """How full a window may be for a request taking ``share`` of it to go; one bigger than
    the window waits for it to empty."""
    return 1.0 - share if share < 0.99 else 0.01


def spend_type(dimension: str) -> str:
    return f"spend_{dimension}"


#: The one-type tuples the gate reads with (a tuple: the field keeps such queries built).
SPEND_TYPES = {dim: (spend_type(dim),) for dim in WINDOWS}
HOLD_TYPES = (HOLD,)


def gate_field(backend: FieldBackend | None = None) -> PheromoneField:
    """A field for a gate: its decays, and an evaporation threshold low enough for tiny spends.

    One request on a 10,000 RPM key spends 1e-4 of the window; at the usual 0.01
    threshold it would never count. Pass the same backend (say Redis) to share it.
    """
    return PheromoneField(
        backend, evaporation_threshold=EVAPORATION_THRESHOLD, decay_by_type=gate_strategies()
    )


def gate_strategies() -> dict[str, Any]:
    """The decay of every signal type the gate deposits (added to the field's policy)."""
    strategies: dict[str, Any] = {
        spend_type(dim): ExponentialDecay(window * math.log(2.0)) for dim, window in WINDOWS.items()
    }
    strategies[HOLD] = LinearDecay(HOLD_RATE)
    strategies.update({"latency": ExponentialDecay(5.0), "success": ExponentialDecay(5.0)})
    strategies["error"] = ExponentialDecay(5.0)
    return strategies


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the upstream, which key (a hash, never the key), which model."""

    upstream: str
    key: str = "-"
    model: str = "-"

    @property
    def region(self) -> str:
        return f"{self.upstream}|{self.key}|{self.model}"

    @property
    def upstream_region(self) -> str:
        return f"{self.upstream}|*"


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request may use: itself, and its input and output token estimates."""

    input_tokens: float = 0.0
    output_tokens: float = 0.0

    def of(self, dimension: str) -> float:
        if dimension in ("rpm", "rpd"):
            return 1.0
        if dimension == "itpm":
            return self.input_tokens
        if dimension == "otpm":
            return self.output_tokens
        return self.input_tokens + self.output_tokens


@dataclass(eq=False)
class Ticket:
    """One request's place in the gate; the pass to go once ``admitted``."""

    agent_id: str
    route: Route
    priority: float
    cost: Cost
    arrived: float
    key: float
    admitted: anyio.Event = field(default_factory=anyio.Event)
    pressure: float = 0.0
    waited: float = 0.0
    credit: float = 0.0  # seconds of waiting it is owed for being behind its share (fairness)
    reservation: Reservation | None = None
    released: bool = False


@dataclass(frozen=True, slots=True)
class ChannelReading:
    """The channel now: how full each window is, how long any hold lasts, the soft pressure."""

    fill: Mapping[str, float]
    hold: float  # seconds until every hold lifts (0: none)
    soft: float


@dataclass(frozen=True, slots=True)
class GateExplanation:
    """Why requests on a channel wait, and until when."""

    route: Route
    waiting: int
    in_flight: int
    reading: ChannelReading
    limits: Mapping[str, float]
    next_admission_in: float | None
    exhausted: str | None

    def __str__(self) -> str:
        parts = [f"{self.route.region}: {self.waiting} waiting, {self.in_flight} in flight"]
        if self.exhausted:
            parts.append(f"refusing: {self.exhausted}")
        if self.reading.hold > 0:
            parts.append(f"held for {self.reading.hold:.2f}s more")
        for dim, fill in self.reading.fill.items():
            parts.append(f"{dim} window {fill:.0%} full of {self.limits[dim]:g}")
        parts.append(f"soft pressure {self.reading.soft:+.3f}")
        if self.next_admission_in is not None:
            parts.append(f"next admission in {self.next_admission_in:.3f}s")
        return "; ".join(parts)


@dataclass(slots=True)
class _Service:
    """Who this process admitted on one channel in the last :data:`FAIRNESS_WINDOW` seconds.

    Least attained service, bounded: an agent with fewer admissions than the mean agent's
    is owed waiting time, up to one *round* (how long one admission per agent takes at
    the recent pace: the mean gap of the last ``agents`` admissions times ``agents``), in
    proportion to how far behind it is. A round is about as long as anyone waits when
    every agent has one request queued, so a straggler (back from a slow answer, or new)
    goes ahead of those already served, and no further: the credit is bounded, so aging
    still lets everyone through. O(agents / 64) per request at worst (a deque's index).
    """

    log: deque[tuple[float, str]] = field(default_factory=deque)  # (admitted at, agent), oldest first
    counts: dict[str, int] = field(default_factory=dict)

    def admitted(self, agent_id: str, now: float) -> None:
        self.log.append((now, agent_id))
        self.counts[agent_id] = self.counts.get(agent_id, 0) + 1
        if len(self.log) > FAIRNESS_LOG:
            self._forget()

    def credit(self, agent_id: str, now: float) -> float:
        """Seconds of waiting ``agent_id`` is owed now (0: it has had at least its share)."""
        log, counts = self.log, self.counts
        while log and log[0][0] < now - FAIRNESS_WINDOW:
            self._forget()
        agents = len(counts)
        behind = min(1.0, len(log) / agents - counts.get(agent_id, 0)) if agents else 0.0
        recent = min(len(log), max(2, agents))  # the pace now: a burst earlier in the window would skew it
        if behind <= 0 or recent < 2:
            return 0.0
        return behind * agents * (log[-1][0] - log[-recent][0]) / (recent - 1)

    def _forget(self) -> None:
        """Drop the oldest admission."""
        _, gone = self.log.popleft()
        if self.counts[gone] == 1:
            del self.counts[gone]
        else:
            self.counts[gone] -= 1


@dataclass(slots=True)
class _Channel:
    waiters: list[tuple[float, int, Ticket]] = field(default_factory=list)
    in_flight: int = 0
    limits: dict[str, float] = field(default_factory=dict)
    hold_until: float = 0.0  # on the gate's clock: holds longer than one signal can carry
    exhausted: tuple[float, str] | None = None  # (epoch deadline, why) for fail-fast quotas
    pumper: Ticket | None = None
    admissions: int = 0
    service: _Service = field(default_factory=_Service)
    changed: anyio.Event = field(default_factory=anyio.Event)
    failures: int = 0  # consecutive 5xx/overloads, for the back-off
    sleepers: int = 0  # tasks waiting on the current ``changed``

    def notify(self) -> None:
        """Wake whoever waits on ``changed``; with nobody waiting there is nothing to wake or replace."""
        if self.sleepers:
            self.changed.set()
            self.changed = anyio.Event()
            self.sleepers = 0

    async def wait_changed(self) -> None:
        """Sleep until :meth:`notify`; counted here, cheaper than asking the event on every notify."""
        event = self.changed
        self.sleepers += 1
        try:
            await event.wait()
        finally:
            if self.changed is event:  # left without a notify (cancelled): no longer waiting
                self.sleepers -= 1


class Gate:
    """Admission control for LLM requests, driven by the pressure in a field.

    ``limits`` gives per-dimension limits for upstreams that send no headers (e.g.
    ``{"rpm": 50}``); headers override them. ``max_in_flight`` and ``max_wait``
    (seconds, then :class:`AdmissionTimeoutError`) are hard caps. ``disable`` switches
    primitives off by name (see :data:`PRIMITIVES`), for ablation studies only: each one
    is part of why no request fails.
    """

    def __init__(
        self,
        field: PheromoneField | None = None,
        *,
        threshold: float = 0.5,
        aging_rate: float = 0.1,
        max_in_flight: int | None = None,
        max_wait: float | None = None,
        limits: Mapping[str, float] | None = None,
        latency_target: float = 10.0,
        budgets: TokenBudgets | None = None,
        clock: Clock | None = None,
        wall_clock: Callable[[], float] | None = None,
        disable: Collection[str] = (),
    ) -> None:
        unknown = sorted(set(disable) - PRIMITIVES.keys())
        if unknown or isinstance(disable, str):
            raise ConfigurationError(
                f"disable={disable!r}: give a collection of names from {', '.join(PRIMITIVES)}"
            )
        if not aging_rate > 0:
            raise ConfigurationError(
                f"aging_rate must be > 0 so that no request waits forever, got {aging_rate!r}"
            )
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be at least 1, got {max_in_flight!r}")
        for dim, value in (limits or {}).items():
            if dim not in WINDOWS or not value > 0:
                raise ConfigurationError(
                    f"limit {dim}={value!r}: use one of {', '.join(WINDOWS)} with a value > 0"
                )
        self._clock: Clock = clock if clock is not None else monotonic_clock
        self._speed = clock.speed if isinstance(clock, AcceleratedClock) else 1.0
        if wall_clock is None:
            wall_clock = clock.wall if isinstance(clock, AcceleratedClock) else time.time
        self._wall = wall_clock
        if isinstance(self._clock, ManualClock):
            self._clock.subscribe(self._time_moved)
        if field is None:
            field = gate_field(InMemoryFieldBackend(clock=self._clock))
        elif field.policy.evaporation_threshold > EVAPORATION_THRESHOLD:
            threshold = field.policy.evaporation_threshold
            raise ConfigurationError(
                f"the gate's field evaporates signals under {threshold:g}, which would drop small spends "
                f"from its windows; build it with gate_field(backend) (threshold {EVAPORATION_THRESHOLD:g})"
            )
        else:
            for name, strategy in gate_strategies().items():
                field.policy.by_type.setdefault(name, strategy)
        self.field = field
        self._own_field = isinstance(field.backend, InMemoryFieldBackend)
        self.disabled = frozenset(disable)
        self.threshold = threshold
        self.aging_rate = 0.0 if "aging" in self.disabled else aging_rate
        self.max_in_flight = None if "occupancy" in self.disabled else max_in_flight
        self.max_wait = max_wait
        self.latency_target = latency_target
        self.budgets = None if "budgets" in self.disabled else budgets
        self._default_limits = {} if "rate_limits" in self.disabled else dict(limits or {})
        self._channels: dict[Route, _Channel] = {}
        self._seq = itertools.count()

    # -- admission ------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(
        self, agent_id: str, route: Route, priority: float = 0.5, cost: Cost | None = None
    ) -> AsyncIterator[Ticket]:
        """Wait for the request's turn, then hold its in-flight place until the block exits."""
        ticket = await self.acquire(agent_id, route, priority, cost)
        try:
            yield ticket
        finally:
            self.release(ticket)

    async def acquire(
        self, agent_id: str, route: Route, priority: float = 0.5, cost: Cost | None = None
    ) -> Ticket:
        """Wait until admitted (see :meth:`admit`); the caller must :meth:`release` the ticket."""
        cost = cost or Cost()
        channel = self._channel(route)
        self._refuse_if_exhausted(route, channel)
        now = self._clock()
        credit = 0.0 if "fairness" in self.disabled else channel.service.credit(agent_id, now)
        ticket = Ticket(agent_id, route, priority, cost, now, -(priority + self.aging_rate * (credit - now)))
        ticket.credit = credit
        if self.budgets is not None:
            ticket.reservation = self.budgets.reserve(agent_id, cost.input_tokens + cost.output_tokens)
        heapq.heappush(channel.waiters, (ticket.key, next(self._seq), ticket))
        try:
            if self.max_wait is None:  # no deadline: no cancel scope to enter and leave on every request
                await self._wait_turn(channel, route, ticket)
            else:
                with anyio.fail_after(self.max_wait):
                    await self._wait_turn(channel, route, ticket)
        except TimeoutError:
            self._abandon(channel, ticket)
            raise AdmissionTimeoutError(
                f"agent {agent_id!r} waited more than {self.max_wait:g}s for {route.region}: "
                f"{self.explain_now(route)}"
            ) from None
        except BaseException:
            self._abandon(channel, ticket)
            raise
        ticket.waited = self._clock() - ticket.arrived
        return ticket

    def release(self, ticket: Ticket, spent_tokens: float | None = None) -> None:
        """The request is over: free its in-flight place and settle its budget reservation."""
        if ticket.released:
            return
        ticket.released = True
        channel = self._channel(ticket.route)
        channel.in_flight -= 1
        if self.budgets is not None and ticket.reservation is not None:
            self.budgets.settle(ticket.reservation, 0.0 if spent_tokens is None else spent_tokens)
        channel.notify()

    def _abandon(self, channel: _Channel, ticket: Ticket) -> None:
        if ticket.admitted.is_set():
            self.release(ticket)
            return
        channel.waiters = [w for w in channel.waiters if w[2] is not ticket]
        heapq.heapify(channel.waiters)
        if self.budgets is not None and ticket.reservation is not None:
            self.budgets.settle(ticket.reservation, 0.0)
        channel.notify()

    async def _wait_turn(self, channel: _Channel, route: Route, ticket: Ticket) -> None:
        """Wait to be admitted. One waiter at a time (the pumper) decides and keeps the timer.

        The others sleep until something changes; when the pumper leaves (admitted
        or cancelled), it hands over and the next one to wake takes its place.
        """
        try:
            while not ticket.admitted.is_set():
                self._refuse_if_exhausted(route, channel)
                if channel.pumper is not None and channel.pumper is not ticket:
                    await channel.wait_changed()
                    continue
                channel.pumper = ticket
                admitted_before = channel.admissions
                delay = await self._pump(route, channel)
                if channel.admissions != admitted_before:
                    channel.notify()  # wake the ones just admitted
                if not ticket.admitted.is_set():
                    manual = isinstance(self._clock, ManualClock)  # it notifies every channel when it moves
                    real = math.inf if delay is None or manual else delay / self._speed
                    with anyio.move_on_after(real):
                        await channel.wait_changed()
        finally:
            if channel.pumper is ticket:
                channel.pumper = None
                channel.notify()

    async def _pump(self, route: Route, channel: _Channel) -> float | None:
        """Admit waiters in pressure order while they may; returns seconds until one may (None: an event)."""
        while channel.waiters:
            ticket = channel.waiters[0][2]
            if self.max_in_flight is not None and channel.in_flight >= self.max_in_flight:
                return None  # a release will wake us
            reading = await self.read(route)
            wait = self._wait_for(route, channel, reading, ticket)
            if wait > 0:
                return wait
            if not await self._spend(route, channel, ticket.cost):
                continue  # another process sharing the field took the room first: read again
            if not self._dequeue(channel, ticket):
                continue  # it gave up while we read and spent; its spend stays (errs on the full side)
            channel.in_flight += 1
            channel.admissions += 1
            now = self._clock()
            channel.service.admitted(ticket.agent_id, now)
            ticket.pressure = ticket.priority + self.aging_rate * self._waited(ticket, now) + reading.soft
            ticket.admitted.set()
        return None

    @staticmethod
    def _waited(ticket: Ticket, now: float) -> float:
        """Seconds the ticket counts as having waited: really, plus what fairness credits it."""
        return now - ticket.arrived + ticket.credit

    @staticmethod
    def _dequeue(channel: _Channel, ticket: Ticket) -> bool:
        """Take ``ticket`` off the queue (False: it left already). Reading and spending may
        suspend (a Redis field), and meanwhile a higher-priority newcomer can take the top."""
        if channel.waiters and channel.waiters[0][2] is ticket:
            heapq.heappop(channel.waiters)
            return True
        kept = [w for w in channel.waiters if w[2] is not ticket]
        if len(kept) == len(channel.waiters):
            return False
        channel.waiters = kept
        heapq.heapify(kept)
        return True

    def _wait_for(self, route: Route, channel: _Channel, reading: ChannelReading, ticket: Ticket) -> float:
        """Seconds until ``ticket`` may go (0: now)."""
        now = self._clock()
        waits = [reading.hold, channel.hold_until - now]
        for dim, fill in reading.fill.items():
            share = ticket.cost.of(dim) / channel.limits[dim]
            room = _room(share)
            if fill > room + 1e-9:
                waits.append(WINDOWS[dim] * math.log(fill / room))  # fill decays as exp(-t / window)
        pressure = ticket.priority + self.aging_rate * self._waited(ticket, now) + reading.soft
        if pressure < self.threshold:
            waits.append((self.threshold - pressure) / self.aging_rate if self.aging_rate else RECHECK)
        return max(0.0, *waits)

    async def _spend(self, route: Route, channel: _Channel, cost: Cost) -> bool:
        """Take the request's share of each window; False if, on a shared field, one no longer fits.

        Reading and spending are two steps, so two processes could both see the last room in a
        window: on a shared field the spend carries floors and is refused in Redis then.
        """
        dims = [d for d in channel.limits if cost.of(d) > 0]
        if not dims:
            return True
        shares = [min(1.0, cost.of(d) / channel.limits[d]) for d in dims]
        floors = (
            []
            if self._own_field
            else [
                PressureFloor(spend_type(d), route.region, -(_room(share) + 1e-9))
                for d, share in zip(dims, shares, strict=True)
            ]
        )
        spent = await self.field.deposit_many(
            GATE_AGENT,
            [spend_type(d) for d in dims],
            [-s for s in shares],
            regions=route.region,
            floors=floors,
        )
        return spent > 0

    # -- reading ----------------------------------------------------------------------------

    async def read(self, route: Route) -> ChannelReading:
        """How full the channel's windows are, how long it is held, and its soft pressure."""
        channel = self._channel(route)
        fill = {dim: await self._fill(route, dim) for dim in channel.limits}
        hold = max(await self._hold(route.region), await self._hold(route.upstream_region))
        soft = await self.field.read_pressure(signal_types=SOFT, region=route.region)
        return ChannelReading(fill, hold, soft)

    async def _fill(self, route: Route, dimension: str) -> float:
        types = SPEND_TYPES.get(dimension) or (spend_type(dimension),)
        spent = await self.field.read_pressure(signal_types=types, region=route.region)
        return max(0.0, -spent)

    async def _hold(self, region: str) -> float:
        if await self.field.read_pressure(signal_types=HOLD_TYPES, region=region) >= 0:
            return 0.0
        explanation = await self.field.explain(signal_types=HOLD_TYPES, region=region)
        return max((c.evaporates_at - explanation.at for c in explanation.contributions), default=0.0)

    def explain_now(self, route: Route) -> str:
        channel = self._channel(route)
        limits = channel.limits or "unknown"
        return f"{len(channel.waiters)} waiting, {channel.in_flight} in flight, limits {limits}"

    async def explain(self, route: Route) -> GateExplanation:
        """Why requests on ``route`` wait and until when."""
        channel = self._channel(route)
        reading = await self.read(route)
        next_in = self._wait_for(route, channel, reading, channel.waiters[0][2]) if channel.waiters else None
        exhausted = channel.exhausted[1] if channel.exhausted else None
        return GateExplanation(
            route, len(channel.waiters), channel.in_flight, reading, dict(channel.limits), next_in, exhausted
        )

    # -- what the upstream said -------------------------------------------------------------

    async def observe(self, route: Route, info: RateLimitInfo) -> None:
        """Deposit what one response's status and headers say: limits and remaining, holds, errors."""
        channel = self._channel(route)
        wall = self._wall()
        if "rate_limits" not in self.disabled:
            await self._learn_limits(route, channel, info, wall)
        if info.outcome == "ok":
            channel.failures = 0
        elif info.outcome in ("daily_quota", "fatal") and info.status in (402, 429):
            until = info.retry_at or max((q.reset_at or 0.0 for q in info.quotas), default=0.0) or None
            why = info.reason or f"upstream answered {info.status}"
            channel.exhausted = (until if until is not None else math.inf, why)
        elif info.outcome == "quota" and "backoff" not in self.disabled:
            until = info.retry_at or min(
                (q.reset_at for q in info.quotas if q.remaining == 0 and q.reset_at), default=None
            )
            await self.hold(route, (until - wall) if until else 1.0 * 2**channel.failures)
            channel.failures += 1
        elif info.outcome == "overloaded" and "backoff" not in self.disabled:
            backoff = (info.retry_at - wall) if info.retry_at else min(30.0, 1.0 * 2**channel.failures)
            channel.failures += 1
            await self.hold(route, backoff, whole_upstream=True)
        elif info.outcome == "transient":
            await self.report_error(route)

    async def finish(
        self, ticket: Ticket, *, input_tokens: float, output_tokens: float, ttft: float | None
    ) -> None:
        """A request completed: reconcile its token spend with the real usage, note latency, release it."""
        channel = self._channel(ticket.route)
        used = Cost(input_tokens, output_tokens)
        dims = [d for d in channel.limits if d not in ("rpm", "rpd")]
        corrections = [(ticket.cost.of(d) - used.of(d)) / channel.limits[d] for d in dims]
        if any(abs(c) > 1e-9 for c in corrections):  # a refund (+) or a top-up (-) of the estimate
            await self.field.deposit_many(
                GATE_AGENT,
                [spend_type(d) for d in dims],
                [max(-1.0, min(1.0, c)) for c in corrections],
                regions=ticket.route.region,
            )
        if "latency" not in self.disabled:
            if ttft is not None and ttft > self.latency_target:
                strain = min(1.0, 0.5 * (ttft / self.latency_target - 1.0))
                await self.field.deposit(GATE_AGENT, "latency", -strain, region=ticket.route.region)
            else:
                await self.field.deposit(GATE_AGENT, "success", 0.05, region=ticket.route.region)
        self.release(ticket, spent_tokens=input_tokens + output_tokens)

    async def report_error(self, route: Route) -> None:
        """A 5xx, a reset connection or a timeout: a short pause and some soft inhibition."""
        channel = self._channel(route)
        pause = min(5.0, 0.25 * 2**channel.failures)
        channel.failures += 1
        if "latency" not in self.disabled:
            await self.field.deposit(GATE_AGENT, "error", -0.3, region=route.region)
        if "backoff" not in self.disabled:
            await self.hold(route, pause)

    async def hold(self, route: Route, seconds: float, *, whole_upstream: bool = False) -> None:
        """Admit nothing on ``route`` (or its whole upstream) for ``seconds``."""
        if not seconds > 0:
            return
        channel = self._channel(route)
        channel.hold_until = max(channel.hold_until, self._clock() + seconds)
        threshold = self.field.policy.evaporation_threshold
        intensity = -min(1.0, seconds * HOLD_RATE + threshold)
        region = route.upstream_region if whole_upstream else route.region
        await self.field.deposit(GATE_AGENT, HOLD, intensity, region=region)
        channel.notify()

    async def _learn_limits(self, route: Route, channel: _Channel, info: RateLimitInfo, wall: float) -> None:
        """Adopt the upstream's limits, and bring the windows to what it says is used.

        A window reads fuller than the upstream's bucket after spends spread over time (it
        decays in proportion to its fill, a bucket refills at a constant rate), so a request
        window is also refunded down to the upstream's count plus every request we have in
        flight, which the upstream may not have counted yet: never below what it could hold.
        Only on an in-memory field: on a shared one (Redis) other processes' requests in
        flight are unknown here, and two proxies refunding alike would both admit too many.
        """
        for quota in info.quotas:
            dim = quota.dimension
            if quota.limit is not None and quota.limit > 0:
                channel.limits[dim] = quota.limit
            limit = channel.limits.get(dim)
            if limit is None or quota.remaining is None:
                continue
            upstream_fill = min(1.0, max(0.0, 1.0 - quota.remaining / limit))
            ours = await self._fill(route, dim)
            if upstream_fill > ours + 1e-9:
                await self.field.deposit(
                    GATE_AGENT, spend_type(dim), -(upstream_fill - ours), region=route.region
                )
            elif self._own_field and dim in ("rpm", "rpd"):
                could_hold = min(1.0, upstream_fill + channel.in_flight / limit)
                # Only a whole request's worth or more: a smaller drift stays (on the full side),
                # so a busy channel does not store a refund with every response.
                if ours > could_hold + 1.0 / limit:
                    await self.field.deposit(
                        GATE_AGENT, spend_type(dim), ours - could_hold, region=route.region
                    )
            if quota.remaining <= 0 and quota.reset_at is not None and dim in ("rpd", "tpd"):
                await self.hold(route, quota.reset_at - wall)  # a day's quota does not trickle back
        channel.notify()

    def now(self) -> float:
        """The gate's clock (seconds): what waits and time to first token are measured on."""
        return self._clock()

    def wall(self) -> float:
        """Epoch seconds on the gate's clock: what rate-limit deadlines are compared with."""
        return self._wall()

    # -- state ------------------------------------------------------------------------------

    def _time_moved(self) -> None:
        for channel in self._channels.values():
            channel.notify()

    def _channel(self, route: Route) -> _Channel:
        channel = self._channels.get(route)
        if channel is None:
            channel = self._channels[route] = _Channel(limits=dict(self._default_limits))
        return channel

    def _refuse_if_exhausted(self, route: Route, channel: _Channel) -> None:
        if channel.exhausted is None:
            return
        until, why = channel.exhausted
        if until <= self._wall():
            channel.exhausted = None
            return
        when = "until further notice"
        if not math.isinf(until):
            when = f"until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(until))} UTC"
        raise QuotaExhaustedError(
            f"{route.region}: the upstream's quota is exhausted ({why}); refusing {when}",
            None if math.isinf(until) else until,
        )

    def channels(self) -> dict[Route, dict[str, Any]]:
        """Per channel: waiting, in flight, known limits (for metrics)."""
        return {
            route: {"waiting": len(c.waiters), "in_flight": c.in_flight, "limits": dict(c.limits)}
            for route, c in self._channels.items()
        }
