"""Decay strategies: closed-form functions of a signal's age.

A strategy never updates a stored value; it says what a signal deposited with
intensity ``I`` is worth ``age`` seconds later. Because of that the field reads the
same whether its evaporation sweep ran once or a thousand times in between.

Every strategy works on numpy arrays (one call evaluates a whole field) and also
offers the scalar ``compute(signal, elapsed_seconds)`` of the stigmergy-scheduler
package, so strategies written for it keep working (see :func:`as_strategy`).

Strategies with a ``decay_rate`` (value = I * exp(-rate * age) until ``lifetime``)
let a backend keep per-target sums as one decayed accumulator, making a read O(1):
``ExponentialDecay`` (rate ln2/half-life) and ``StepDecay`` (rate 0 until its TTL).
The others are evaluated vectorised.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from stigmergy.errors import ConfigurationError

if TYPE_CHECKING:
    from stigmergy.signal import Signal

FloatArray = npt.NDArray[np.float64]
SaltArray = npt.NDArray[np.uint64]

_LN2 = math.log(2.0)


@runtime_checkable
class DecayStrategy(Protocol):
    """What a decay strategy provides.

    ``apply`` maps deposit intensities and ages (seconds, >= 0) to current values; it
    must not grow ``|value|`` with age. ``salt`` is a per-signal random ``uint64``
    for strategies that want per-signal randomness; others ignore it.
    ``lifetime`` is the age at which ``|value|`` falls under ``threshold``
    (``inf`` if never): the moment the signal evaporates.
    """

    decay_rate: float | None

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray: ...

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray: ...

    def compute(self, signal: Signal, elapsed_seconds: float) -> float: ...


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def signal_salt(signal_id: str) -> int:
    """A stable per-signal salt derived from its id (for scalar ``compute`` calls)."""
    return int.from_bytes(hashlib.blake2b(signal_id.encode(), digest_size=8).digest(), "little")


class _Scalar:
    """The scalar ``compute`` of stigmergy-scheduler, expressed through ``apply``."""

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        raise NotImplementedError

    def compute(self, signal: Signal, elapsed_seconds: float) -> float:
        value = self.apply(
            np.array([signal.intensity]),
            np.array([max(0.0, elapsed_seconds)]),
            np.array([signal_salt(signal.id)], dtype=np.uint64),
        )
        return float(value[0])


class ExponentialDecay(_Scalar):
    """Halves every ``half_life_seconds``: the natural model for evidence that fades."""

    def __init__(self, half_life_seconds: float = 3600.0) -> None:
        self.half_life_seconds = _positive("half_life_seconds", half_life_seconds)
        self.decay_rate: float | None = _LN2 / self.half_life_seconds

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        return np.asarray(intensity * np.exp2(-age / self.half_life_seconds), dtype=np.float64)

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray:
        magnitude = np.abs(intensity)
        with np.errstate(divide="ignore"):
            life = self.half_life_seconds * np.log2(magnitude / threshold)
        return np.where(magnitude < threshold, 0.0, life)

    def __repr__(self) -> str:
        return f"ExponentialDecay(half_life_seconds={self.half_life_seconds!r})"


class StepDecay(_Scalar):
    """Full strength until ``ttl_seconds``, then gone: claims, leases, reset windows."""

    decay_rate: float | None = 0.0

    def __init__(self, ttl_seconds: float = 3600.0) -> None:
        self.ttl_seconds = _positive("ttl_seconds", ttl_seconds)

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        return np.where(age < self.ttl_seconds, intensity, 0.0)

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray:
        return np.where(np.abs(intensity) < threshold, 0.0, self.ttl_seconds)

    def __repr__(self) -> str:
        return f"StepDecay(ttl_seconds={self.ttl_seconds!r})"


class LinearDecay(_Scalar):
    """Loses ``rate_per_second`` of magnitude each second: a hard, predictable expiry."""

    decay_rate: float | None = None

    def __init__(self, rate_per_second: float = 0.001) -> None:
        self.rate_per_second = _positive("rate_per_second", rate_per_second)

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        magnitude = np.maximum(np.abs(intensity) - self.rate_per_second * age, 0.0)
        return np.asarray(np.sign(intensity) * magnitude, dtype=np.float64)

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray:
        return np.maximum((np.abs(intensity) - threshold) / self.rate_per_second, 0.0)

    def __repr__(self) -> str:
        return f"LinearDecay(rate_per_second={self.rate_per_second!r})"


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _unit_noise(salt: SaltArray, seed: int) -> FloatArray:
    """Deterministic noise in [-1, 1) per salt (splitmix64 finaliser): same signal, same draw."""
    with np.errstate(over="ignore"):
        z = salt.astype(np.uint64) ^ np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        z = z ^ (z >> np.uint64(31))
    return np.asarray((z >> np.uint64(11)).astype(np.float64) / 2.0**52 - 1.0)


class StochasticDecay(_Scalar):
    """Exponential decay whose half-life each signal draws once, within +/- ``noise_factor``.

    The randomness of classical self-organisation (some trails outlive others)
    without breaking closed form: a signal's draw is fixed by ``seed`` and its salt,
    so its value is a pure function of its age and ``|value|`` never grows.
    """

    decay_rate: float | None = None

    def __init__(
        self, half_life_seconds: float = 3600.0, noise_factor: float = 0.1, seed: int | None = None
    ) -> None:
        self.half_life_seconds = _positive("half_life_seconds", half_life_seconds)
        if (
            isinstance(noise_factor, bool)
            or not isinstance(noise_factor, int | float)
            or not (0.0 <= noise_factor < 1.0)
        ):
            raise ConfigurationError(f"noise_factor must be in [0, 1), got {noise_factor!r}")
        self.noise_factor = float(noise_factor)
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed)
        self._seed = self.seed & 0xFFFFFFFFFFFFFFFF

    def half_lives(self, salt: SaltArray) -> FloatArray:
        """Each signal's own half-life."""
        return self.half_life_seconds * (1.0 + self.noise_factor * _unit_noise(salt, self._seed))

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        return np.asarray(intensity * np.exp2(-age / self.half_lives(salt)), dtype=np.float64)

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray:
        magnitude = np.abs(intensity)
        with np.errstate(divide="ignore"):
            life = self.half_lives(salt) * np.log2(magnitude / threshold)
        return np.where(magnitude < threshold, 0.0, life)

    def __repr__(self) -> str:
        return (
            f"StochasticDecay(half_life_seconds={self.half_life_seconds!r}, "
            f"noise_factor={self.noise_factor!r}, seed={self.seed!r})"
        )


class _ScalarStrategy(_Scalar):
    """Adapts a strategy that only has the scalar ``compute(signal, elapsed)`` of stigmergy-scheduler."""

    decay_rate: float | None = None

    def __init__(self, legacy: Any) -> None:
        self.legacy = legacy

    def apply(self, intensity: FloatArray, age: FloatArray, salt: SaltArray) -> FloatArray:
        from stigmergy.signal import Signal

        values = [
            self.legacy.compute(Signal(id=f"{int(s):x}", signal_type="_", intensity=float(i)), float(a))
            for i, a, s in zip(intensity, age, salt, strict=True)
        ]
        return np.asarray(values, dtype=np.float64)

    def lifetime(self, intensity: FloatArray, threshold: float, salt: SaltArray) -> FloatArray:
        return np.full(len(intensity), np.inf)

    def __repr__(self) -> str:
        return f"as_strategy({self.legacy!r})"


def as_strategy(strategy: Any) -> DecayStrategy:
    """Accept any strategy: ours, one implementing the protocol, or a scalar-only legacy one."""
    if hasattr(strategy, "apply") and hasattr(strategy, "lifetime"):
        if not hasattr(strategy, "decay_rate"):
            strategy.decay_rate = None
        return strategy  # type: ignore[no-any-return]
    if callable(getattr(strategy, "compute", None)):
        return _ScalarStrategy(strategy)
    raise ConfigurationError(
        f"{strategy!r} is not a decay strategy: give it apply(intensity, age, salt) and "
        "lifetime(intensity, threshold, salt), or at least compute(signal, elapsed_seconds)"
    )


class DecayPolicy:
    """Which strategy decays which signal type, and where evaporation begins.

    A field hands its policy to its backend once; every process sharing a field
    must use the same one.
    """

    def __init__(
        self,
        default: Any = None,
        by_type: dict[str, Any] | None = None,
        evaporation_threshold: float = 0.01,
    ) -> None:
        self.default = as_strategy(default if default is not None else ExponentialDecay())
        self.by_type = {name: as_strategy(s) for name, s in (by_type or {}).items()}
        if (
            isinstance(evaporation_threshold, bool)
            or not isinstance(evaporation_threshold, int | float)
            or not 0.0 < evaporation_threshold < 1.0
        ):
            raise ConfigurationError(
                f"evaporation_threshold must be in (0, 1), got {evaporation_threshold!r}"
            )
        self.evaporation_threshold = float(evaporation_threshold)

    def strategy(self, signal_type: str) -> DecayStrategy:
        """The strategy for ``signal_type`` (the default unless one was chosen for it)."""
        return self.by_type.get(signal_type, self.default)

    def __repr__(self) -> str:
        return (
            f"DecayPolicy(default={self.default!r}, by_type={self.by_type!r}, "
            f"evaporation_threshold={self.evaporation_threshold!r})"
        )
