"""Clocks: the field reads time through one, so tests can move time by hand."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import anyio

from stigmergy.errors import ConfigurationError


class Clock(Protocol):
    """Seconds on a monotonic scale; only differences matter."""

    def __call__(self) -> float: ...


def monotonic_clock() -> float:
    """The default clock: ``time.monotonic``, immune to wall-clock jumps."""
    return time.monotonic()


class ManualClock:
    """A clock that moves only when told to: deterministic tests, no sleeps."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever time moves (a scheduler waiting on this clock wakes)."""
        self._listeners.append(listener)

    def _moved(self) -> None:
        for listener in self._listeners:
            listener()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never backwards) and return the new time."""
        if not seconds >= 0:
            raise ConfigurationError(f"a clock only moves forward; got advance({seconds!r})")
        self._now += seconds
        self._moved()
        return self._now

    def set(self, now: float) -> None:
        """Jump to ``now``, which must not be earlier than the current time."""
        if not now >= self._now:
            raise ConfigurationError(f"a clock only moves forward; {now!r} < {self._now!r}")
        self._now = float(now)
        self._moved()


class AcceleratedClock:
    """Time that runs ``speed`` times faster than real time, for everything that shares it.

    A gate, a mock provider and a field on one accelerated clock agree on every
    window, reset and deadline, so a test of a 60-per-minute limit takes seconds.
    ``wall()`` is the matching epoch time; :meth:`sleep` waits in accelerated seconds.
    """

    def __init__(self, speed: float) -> None:
        if not 0 < speed < float("inf"):
            raise ConfigurationError(f"speed must be a positive factor, got {speed!r}")
        self.speed = float(speed)
        self._start, self._wall_start = time.monotonic(), time.time()

    def __call__(self) -> float:
        return self._start + (time.monotonic() - self._start) * self.speed

    def wall(self) -> float:
        return self._wall_start + (time.monotonic() - self._start) * self.speed

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds / self.speed)
