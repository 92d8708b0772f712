"""Signal: one trace deposited into the field, frozen and validated at the door."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from stigmergy.errors import InvalidSignalError


def check_intensity(value: Any, what: str = "intensity") -> float:
    """Return ``value`` as a float if it is finite and in [-1, 1]; raise otherwise.

    Never clamps: a caller who asks for 1.5 has a bug worth hearing about.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSignalError(f"{what} must be a number in [-1, 1], got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not -1.0 <= number <= 1.0:
        raise InvalidSignalError(f"{what} must be a finite number in [-1, 1], got {value!r}")
    return number


def check_name(value: Any, what: str, *, optional: bool = False) -> str | None:
    """Agent ids, signal types and regions are non-empty strings (or None where optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidSignalError(f"{what} must be a non-empty string, got {value!r}")
    if not value.isprintable():
        raise InvalidSignalError(f"{what} must not contain control characters, got {value!r}")
    return value


def check_metadata(value: Any) -> dict[str, Any]:
    """Metadata must survive JSON, because a shared (Redis) field stores it as JSON."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidSignalError(f"metadata must be a dict, got {type(value).__name__}")
    if value:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidSignalError(
                f"metadata must be JSON-serialisable (str keys; str, number, bool, None, "
                f"list, dict values; no NaN): {exc}"
            ) from None
    return value


@dataclass(frozen=True, slots=True)
class Signal:
    """An immutable trace in the field.

    ``intensity`` is the value at deposit time when returned by ``deposit`` and the
    current, decayed value when returned by ``read`` (what the signal presses with
    now). Negative intensity is repulsion. ``target_agent_id`` limits who feels it;
    ``region`` places it in task space. ``deposited_at`` is on the field's clock.
    """

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    agent_id: str = ""
    signal_type: str = ""
    intensity: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    target_agent_id: str | None = None
    region: str | None = None
    deposited_at: float = 0.0

    def __post_init__(self) -> None:
        check_intensity(self.intensity)
        check_name(self.signal_type, "signal_type")
        check_metadata(self.metadata)

    def with_intensity(self, new_intensity: float) -> Signal:
        """A copy with another intensity (validated, never clamped)."""
        return replace(self, intensity=new_intensity)

    @property
    def age_seconds(self) -> float:
        """Wall-clock seconds since the signal was deposited."""
        return (datetime.now(UTC) - self.created_at).total_seconds()

    @property
    def is_attraction(self) -> bool:
        return self.intensity > 0

    @property
    def is_repulsion(self) -> bool:
        return self.intensity < 0
