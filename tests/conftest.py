"""Shared fixtures: every async test runs on asyncio and on trio (anyio's pytest plugin)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from redis_servers import redis_cluster, redis_server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``STIGMERGY_REDIS_URL`` if set, else our own redis-server on a free port."""
    if url := os.environ.get("STIGMERGY_REDIS_URL"):
        yield url
        return
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    with redis_cluster() as url:
        yield url
