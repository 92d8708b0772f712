"""The backend conformance suite on every backend we ship."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from stigmergy import ExponentialDecay, InMemoryFieldBackend, ManualClock, PheromoneField
from stigmergy.backends.redis_backend import RedisFieldBackend
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


class RedisHarness:
    """Fields on fresh key prefixes of one Redis client, all on one manual clock."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # redis-py's client is asyncio-only

    async def client(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    async def harness(self) -> AsyncIterator[FieldHarness]:
        clock = ManualClock(1000.0)
        client = await self.client()

        async def make_field(**kwargs: Any) -> PheromoneField:
            backend = RedisFieldBackend(client, f"test-{uuid.uuid4().hex}", clock=clock)
            return PheromoneField(backend, **kwargs)

        field = await make_field(decay_strategy=ExponentialDecay(HALF_LIFE))
        yield FieldHarness(field, clock.advance, make_field)
        await client.aclose()


class TestFakeRedisBackend(RedisHarness, FieldConformance):
    async def client(self) -> Any:
        return fakeredis.FakeAsyncRedis()


class TestRedisServerBackend(RedisHarness, FieldConformance):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> None:
        self.url = redis_url

    async def client(self) -> Any:
        return Redis.from_url(self.url)


class TestRedisClusterBackend(RedisHarness, FieldConformance):
    @pytest.fixture(autouse=True)
    def _cluster(self, redis_cluster_url: str) -> None:
        self.url = redis_cluster_url

    async def client(self) -> Any:
        return RedisCluster.from_url(self.url.replace("redis+cluster://", "redis://"))
