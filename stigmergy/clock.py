"""Clocks: the field reads time through one, so tests can move time by hand."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

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
