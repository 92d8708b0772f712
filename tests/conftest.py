"""Shared fixtures: every async test runs on asyncio and on trio (anyio's pytest plugin)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from stigmergy.redis_servers import redis_cluster, redis_server


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def unavailable(reason: str) -> None:
    """Skip a real-Redis test where Redis cannot run here; under CI=true, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the real-Redis tests (.ci/run installs redis-server)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``STIGMERGY_REDIS_URL`` if set, else our own redis-server on a free port."""
    if url := os.environ.get("STIGMERGY_REDIS_URL"):
        yield url
        return
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed and STIGMERGY_REDIS_URL is not set")
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real three-node Redis Cluster, started for this test session."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are needed for the cluster tests")
    with redis_cluster() as url:
        yield url
