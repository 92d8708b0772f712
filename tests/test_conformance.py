"""The backend conformance suite on every backend we ship."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from stigmergy import ExponentialDecay, InMemoryFieldBackend, ManualClock, PheromoneField
from stigmergy.testing import HALF_LIFE, FieldConformance, FieldHarness


class TestInMemoryBackend(FieldConformance):
    @pytest.fixture
    async def harness(self) -> AsyncIterator[FieldHarness]:
        clock = ManualClock(1000.0)

        async def make_field(**kwargs: Any) -> PheromoneField:
            return PheromoneField(InMemoryFieldBackend(clock=clock), **kwargs)

        field = await make_field(decay_strategy=ExponentialDecay(HALF_LIFE))
        yield FieldHarness(field, clock.advance, make_field)
        await field.aclose()
