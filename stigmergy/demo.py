"""``stigmergy demo``: agents sharing one rate-limited API, without and with the field.

A simulation on a manual clock (it runs in a moment, no network): an upstream
allows ``limit`` requests per ``window`` seconds and answers 429 past that.
Uncoordinated agents fire whenever they are ready and retry a second after a 429.
Coordinated agents deposit a step-decaying ``request`` signal (-1/limit, lasting one
window) at the channel for every call and fire only while the channel's pressure
leaves room: the field is their shared memory of what the window holds.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from stigmergy.backends.memory import InMemoryFieldBackend
from stigmergy.clock import ManualClock
from stigmergy.decay import StepDecay
from stigmergy.field import PheromoneField

STEP = 0.05  # simulated seconds per tick
CHANNEL = "api"


@dataclass
class Outcome:
    """What one run cost."""

    name: str
    calls: int
    rejected: int
    makespan: float


class Upstream:
    """Fixed-window rate limit, as most LLM APIs enforce per minute."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self.accepted: list[float] = []
        self.rejected = 0

    def call(self, now: float) -> bool:
        start = now - now % self.window
        if sum(1 for t in self.accepted if t >= start) >= self.limit:
            self.rejected += 1
            return False
        self.accepted.append(now)
        return True


async def _simulate(
    coordinated: bool, agents: int, calls: int, limit: int, window: float, seed: int
) -> Outcome:
    rng = random.Random(seed)
    clock = ManualClock()
    field = PheromoneField(InMemoryFieldBackend(clock=clock), StepDecay(window))
    upstream = Upstream(limit, window)
    left = {f"agent-{i:02d}": calls for i in range(agents)}
    ready_at = {name: rng.uniform(0, 1) for name in left}
    while any(left.values()):
        now = clock()
        for name in rng.sample(sorted(left), len(left)):
            if not left[name] or ready_at[name] > now:
                continue
            if coordinated:
                room = 1.0 + await field.read_pressure(region=CHANNEL)
                if room < 1.0 / limit - 1e-9:  # the window is full: wait, do not spend a call
                    continue
                await field.deposit(name, "request", -1.0 / limit, region=CHANNEL)
            if upstream.call(now):
                left[name] -= 1
                ready_at[name] = now + rng.uniform(0.2, 1.0)  # the agent thinks, then calls again
            else:
                ready_at[name] = now + 1.0
        clock.advance(STEP)
    label = "through the field" if coordinated else "uncoordinated"
    return Outcome(label, len(upstream.accepted) + upstream.rejected, upstream.rejected, clock())


def run_demo(agents: int = 8, seconds: float = 30.0, seed: int = 7) -> int:
    """Run both simulations and print them side by side; returns an exit code."""
    if agents < 1 or seconds <= 0:
        print("stigmergy demo: --agents must be >= 1 and --seconds > 0")
        return 2
    window, limit = 10.0, max(1, agents)
    calls = max(1, int(seconds / window * limit / agents))
    print(
        f"{agents} agents, {calls} calls each, sharing an API that allows {limit} requests "
        f"per {window:g} s (simulated time)\n"
    )
    results = [
        asyncio.run(_simulate(coordinated, agents, calls, limit, window, seed))
        for coordinated in (False, True)
    ]
    print(f"{'':20}{'requests sent':>15}{'429s':>8}{'makespan':>11}")
    for r in results:
        print(f"{r.name:20}{r.calls:>15}{r.rejected:>8}{r.makespan:>10.1f}s")
    lower_bound = (agents * calls - 1) // limit * window
    print(f"\nlower bound set by the limit: {lower_bound:.1f}s")
    return 0
