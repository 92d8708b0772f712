"""What only the Redis backend must do: share a field across processes, survive faults, stay bounded."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import fakeredis
import pytest
from redis.asyncio import Redis

from stigmergy import (
    BackendUnavailableError,
    ConfigurationError,
    ExponentialDecay,
    InMemoryFieldBackend,
    LinearDecay,
    ManualClock,
    PheromoneField,
    StepDecay,
    StochasticDecay,
    backend_from_url,
)
from stigmergy.backends import redis_backend
from stigmergy.backends.redis_backend import RedisFieldBackend, redact
from stigmergy.redis_servers import RedisServer, free_port, redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server this test may restart or break."""
    with redis_server() as server:
        yield server


def prefix() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_urls_pick_backends_and_redact_passwords() -> None:
    assert isinstance(backend_from_url("memory://"), InMemoryFieldBackend)
    backend = backend_from_url("redis://:s3cret@127.0.0.1:6390/2?key_prefix=swarm")
    assert isinstance(backend, RedisFieldBackend)
    assert backend._keys[0] == "stigmergy:{swarm}:sig"
    assert "s3cret" not in backend._description and "***" in backend._description
    assert redact("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"
    assert redact("redis://host:1/0") == "redis://host:1/0"
    with pytest.raises(ConfigurationError, match="memory://"):
        backend_from_url("postgres://x")
    with pytest.raises(ConfigurationError, match="braces"):
        RedisFieldBackend(object(), "a{b}")


async def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    port = free_port()
    field = PheromoneField(backend_from_url(f"redis://:hunter2@127.0.0.1:{port}/0"))
    with anyio.fail_after(15), pytest.raises(BackendUnavailableError) as error:
        await field.read_pressure("a")
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "***" in message and "hunter2" not in message
    assert "Check that the server is running" in message
    await field.aclose()


async def test_a_dropped_connection_reconnects_or_fails_fast(client: Redis, redis_url: str) -> None:
    field = PheromoneField(RedisFieldBackend(Redis.from_url(redis_url), prefix(), owns_client=True))
    await field.deposit("a", "work", 0.5)
    await client.client_kill_filter(_type="normal", skipme=True)
    with anyio.fail_after(15):
        with contextlib.suppress(BackendUnavailableError):  # allowed once; the next call must reconnect
            await field.read_pressure("b")
        assert math.isclose(await field.read_pressure("b"), 0.5, rel_tol=1e-3)
    await field.aclose()


async def test_scripts_reload_after_script_flush(client: Redis) -> None:
    field = PheromoneField(RedisFieldBackend(client, prefix()), ExponentialDecay(1e6))
    await field.deposit("a", "work", 0.5)
    await client.script_flush()
    await field.deposit("a", "work", 0.25)
    assert math.isclose(await field.read_pressure("b"), 0.75, rel_tol=1e-6)


async def test_a_restart_without_persistence_leaves_an_empty_working_field(own_server: RedisServer) -> None:
    field = PheromoneField(backend_from_url(own_server.url), ExponentialDecay(1e6))
    await field.deposit("a", "work", 0.5)
    own_server.stop()
    with anyio.fail_after(15), pytest.raises(BackendUnavailableError):
        await field.read_pressure("b")
    own_server.start()
    with anyio.fail_after(15):
        for _ in range(3):  # the pool may hand out a dead connection once more
            try:
                assert await field.read_pressure("b") == 0.0
                break
            except BackendUnavailableError:
                continue
        assert await field.signal_count() == 0
        await field.deposit("a", "work", 0.5)
        assert math.isclose(await field.read_pressure("b"), 0.5, rel_tol=1e-6)
    await field.aclose()


async def test_processes_sharing_a_field_must_share_its_policy() -> None:
    client = fakeredis.FakeAsyncRedis()
    name = prefix()
    await PheromoneField(RedisFieldBackend(client, name), ExponentialDecay(10.0)).read_pressure("a")
    same = PheromoneField(RedisFieldBackend(client, name), ExponentialDecay(10.0))
    assert await same.read_pressure("a") == 0.0
    other = PheromoneField(RedisFieldBackend(client, name), ExponentialDecay(20.0))
    with pytest.raises(ConfigurationError, match="same decay settings"):
        await other.read_pressure("a")


async def test_a_field_written_in_another_storage_layout_is_refused() -> None:
    client = fakeredis.FakeAsyncRedis()
    backend = RedisFieldBackend(client, prefix())
    old = {"threshold": 0.01, "default": ["e", math.log(2.0) / 10.0, 0.0], "by_type": {}}
    await client.hset(backend._config_key, "policy", json.dumps(old, sort_keys=True))
    with pytest.raises(ConfigurationError, match="stigmergy version"):
        await PheromoneField(backend, ExponentialDecay(10.0)).read_pressure("a")


async def test_batch_sums_are_the_ones_retirement_takes_back() -> None:
    """The client sums a batch into the script's sum fields: retiring every signal, one by one in
    Lua, must leave no sum behind (a field named differently would stay)."""
    client = fakeredis.FakeAsyncRedis()
    clock = ManualClock(1000.0)
    backend = RedisFieldBackend(client, prefix(), clock=clock)
    field = PheromoneField(backend, ExponentialDecay(10.0), decay_by_type={"claim": StepDecay(5.0)})
    shapes = [(None, None), ("b", None), ("a", None), (None, "r"), ("b", "r"), ("a", "r")]
    for signal_type in ("work", "claim"):
        await field.deposit_many(
            ["a"] * len(shapes),
            signal_type,
            [0.5, 0.25, 0.125, -0.5, 0.75, 1.0],
            target_agent_ids=[target for target, _ in shapes],
            regions=[region for _, region in shapes],
        )
    assert await client.hlen(backend._keys[2]) > 0
    assert math.isclose(await field.read_pressure("b"), 2 * (0.5 + 0.25 - 0.5 + 0.75))
    assert await field.clear_agent("a") == 2 * len(shapes)
    assert (await client.hlen(backend._keys[2]), await client.hlen(backend._keys[3])) == (0, 0)


async def test_the_all_agent_read_survives_a_rebase_with_live_sums(redis_url: str) -> None:
    """Real Redis keeps every agent's net sum in one vector per type as well: a rebase rescales the
    sums, and the vector with them, or the all-agent read comes back e^100 times too large."""
    clock = ManualClock(1000.0)
    client = Redis.from_url(redis_url)
    redis_field = PheromoneField(RedisFieldBackend(client, prefix(), clock=clock), ExponentialDecay(1.0))
    memory_field = PheromoneField(InMemoryFieldBackend(clock=clock), ExponentialDecay(1.0))
    rebase_after = 100 / math.log(2.0)  # REBASE / rate, from the type's first deposit
    for field in (redis_field, memory_field):
        await field.deposit("a", "work", 0.5)  # the type's epoch
    clock.advance(rebase_after - 1.0)
    for field in (redis_field, memory_field):
        await field.deposit("a", "work", 0.8, target_agent_id="b")
        await field.deposit("c", "work", 0.4)
    clock.advance(2.0)  # the next script rebases, while both signals are alive
    expected = await memory_field.read_pressures()
    got = await redis_field.read_pressures()
    assert got.keys() == expected.keys() == {"a", "b", "c"}
    assert all(math.isclose(got[a], v, rel_tol=1e-9, abs_tol=1e-12) for a, v in expected.items()), got
    assert expected["b"] > 0.1
    await client.aclose()


async def test_the_all_agent_read_follows_single_writes_into_a_large_vector(redis_url: str) -> None:
    """A write touching a few of many agents patches their slots in place; one touching many
    rewrites the type's segment; new agents past the capacity (64) move every segment: all must
    read as the memory backend does."""
    clock = ManualClock(1000.0)
    client = Redis.from_url(redis_url)
    name = prefix()
    redis_field = PheromoneField(RedisFieldBackend(client, name, clock=clock), ExponentialDecay(30.0))
    memory_field = PheromoneField(InMemoryFieldBackend(clock=clock), ExponentialDecay(30.0))
    rng = random.Random(11)
    agents = [f"a{i}" for i in range(100)]
    for field, signal_type in itertools.product((redis_field, memory_field), ("work", "claim")):
        await field.deposit_many(agents[:60], signal_type, [0.5] * 60, target_agent_ids=agents[1:61])
    for step in range(40):
        agent, target, intensity = rng.choice(agents), rng.choice([None, *agents]), rng.uniform(-1.0, 1.0)
        signal_type = rng.choice(["work", "claim"])
        for field in (redis_field, memory_field):
            await field.deposit(agent, signal_type, intensity, target_agent_id=target)
            if step % 10 == 9:
                await field.clear_agent(agent)
        clock.advance(1.0)
        expected, got = await memory_field.read_pressures(), await redis_field.read_pressures()
        assert got.keys() == expected.keys()
        assert all(math.isclose(got[a], v, rel_tol=1e-9, abs_tol=1e-12) for a, v in expected.items()), step
    decoding = Redis.from_url(redis_url, decode_responses=True)  # can't take the vectors: reads the fields
    text_field = PheromoneField(RedisFieldBackend(decoding, name, clock=clock), ExponentialDecay(30.0))
    assert await text_field.read_pressures() == await redis_field.read_pressures()
    await decoding.aclose()
    await client.aclose()


async def test_strategies_redis_cannot_compute_are_refused() -> None:
    class Custom:
        def compute(self, signal: Any, elapsed_seconds: float) -> float:
            return float(signal.intensity)

    field = PheromoneField(RedisFieldBackend(fakeredis.FakeAsyncRedis(), prefix()), Custom())
    with pytest.raises(ConfigurationError, match="in-memory backend"):
        await field.read_pressure("a")


async def test_time_comes_from_the_server(client: Redis) -> None:
    field = PheromoneField(RedisFieldBackend(client, prefix()), ExponentialDecay(3600.0))
    signal = await field.deposit("a", "work", 0.5)
    assert abs(signal.deposited_at - time.time()) < 5.0
    assert abs(await field.now() - time.time()) < 5.0


async def test_stochastic_and_linear_decay_in_redis(client: Redis) -> None:
    clock = ManualClock(1000.0)
    noisy = StochasticDecay(10.0, noise_factor=0.5)
    backend = RedisFieldBackend(client, prefix(), clock=clock)
    field = PheromoneField(backend, ExponentialDecay(10.0), decay_by_type={"n": noisy, "l": LinearDecay(0.1)})
    await field.deposit_many(["a"] * 50, "n", 0.8)
    await field.deposit("a", "l", 0.5, target_agent_id="b")
    clock.advance(4.0)
    values = [s.intensity for s in await field.read(signal_types=["n"])]
    assert all(0.8 * 2 ** (-4 / 5) - 1e-12 <= v <= 0.8 * 2 ** (-4 / 15) + 1e-12 for v in values)
    assert len(set(values)) > 1  # each signal drew its own half-life
    assert math.isclose(await field.read_pressure("b"), sum(values) + 0.1, rel_tol=1e-9)


async def test_memory_is_bounded_under_a_constant_deposit_rate(client: Redis) -> None:
    clock = ManualClock(1000.0)
    backend = RedisFieldBackend(client, prefix(), clock=clock, idle_ttl=600)
    field = PheromoneField(backend, ExponentialDecay(1.0), decay_by_type={"claim": StepDecay(2.0)})
    sizes = []
    for round_ in range(12):
        await field.deposit_many([f"a{i}" for i in range(200)], "work", 0.5, target_agent_ids="t")
        await field.deposit_many([f"a{i}" for i in range(200)], "claim", 0.5, regions=f"r{round_ % 3}")
        clock.advance(10.0)
        await field.decay()
        sizes.append(
            (
                await field.signal_count(),
                await client.hlen(backend._keys[2]),
                await client.hlen(backend._keys[3]),
                await client.zcard(backend._keys[1]),
                await client.hlen(backend._keys[9]),
            )
        )
    assert sizes[-1] == (0, 0, 0, 0, 0)  # no signals, sums, counts, expiry or batch entries left
    ttl = await client.ttl(backend._keys[5])
    assert 0 < ttl <= 600  # idle keys expire


@pytest.mark.slow
def test_four_processes_deposit_without_losing_an_update(redis_url: str) -> None:
    processes, deposits, name = 4, 200, prefix()
    worker = Path(__file__).with_name("redis_worker.py")
    running = [
        subprocess.Popen(
            [sys.executable, str(worker), redis_url, name, str(i), str(deposits), str(processes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    reports = []
    for proc in running:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert all(r["signals"] == processes * (deposits + 1) for r in reports)
    assert all(r["count"] == processes * deposits * 0.5 for r in reports)  # exact: no lost update
    fading = [r["fading"] for r in reports]
    assert all(math.isclose(f, fading[0], rel_tol=1e-6) for f in fading)  # everyone reads the same field
    assert math.isclose(fading[0], processes * 0.25, rel_tol=1e-4)


@pytest.mark.parametrize("server", ["fakeredis", "redis-server"])
async def test_long_runs_read_the_same_as_the_memory_backend_across_rebases(
    server: str, request: pytest.FixtureRequest
) -> None:
    """A one-second half-life over ~20 minutes: without rebasing, the landmark sums would overflow.
    On redis-server the all-agent read comes from the per-type vectors, rebuilt at each rebase."""
    clock = ManualClock(1000.0)
    policy: dict[str, Any] = {
        "decay_strategy": ExponentialDecay(1.0),
        "decay_by_type": {"claim": StepDecay(30.0), "slow": ExponentialDecay(60.0)},
    }
    if server == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    redis_field = PheromoneField(RedisFieldBackend(client, prefix(), clock=clock), **policy)
    memory_field = PheromoneField(InMemoryFieldBackend(clock=clock), **policy)
    rng = __import__("random").Random(5)
    agents = [f"a{i}" for i in range(6)]
    for step in range(240):
        state = rng.getstate()
        for field in (redis_field, memory_field):
            rng.setstate(state)  # the same deposits on both
            for _ in range(3):
                await field.deposit(
                    rng.choice(agents),
                    rng.choice(["work", "claim", "slow"]),
                    rng.uniform(-1.0, 1.0),
                    target_agent_id=rng.choice([None, *agents]),
                    region=rng.choice([None, "r1", "r2"]),
                )
        clock.advance(rng.choice([0.5, 10.0]))
        if step % 7 == 0:
            assert await redis_field.decay() == await memory_field.decay()
        for agent in [None, *agents]:
            for region in (None, "r1"):
                expected = await memory_field.read_pressure(agent, region=region)
                got = await redis_field.read_pressure(agent, region=region)
                assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9), (step, agent, region)
        for asked in (agents, None):  # the given agents, then every agent seen
            expected_all = await memory_field.read_pressures(asked)
            got_all = await redis_field.read_pressures(asked)
            assert got_all.keys() == expected_all.keys()
            for a, v in expected_all.items():
                assert math.isclose(got_all[a], v, rel_tol=1e-9, abs_tol=1e-9), (step, asked, a)
    assert clock() - 1000.0 > 1100  # e^(rate * elapsed) would overflow a double without rebasing
    if server != "fakeredis":
        await client.aclose()


@pytest.mark.parametrize("server", ["fakeredis", "redis-server"])
async def test_batches_retire_on_time_through_rescales_and_removals(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's signals of one type are indexed for expiry as one entry, in order of |I|: readings
    and decay() counts must match the memory backend while they evaporate, are rescaled (leaving
    their batch) and removed, and no index entry may stay once every signal is gone."""
    monkeypatch.setattr(redis_backend, "_BATCH_MAX", 7)  # deposits of 20 and 40 span several entries
    clock = ManualClock(1000.0)
    if server == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    policy: dict[str, Any] = {
        "decay_strategy": ExponentialDecay(2.0),
        "decay_by_type": {"claim": StepDecay(3.0), "slow": LinearDecay(0.05)},
    }
    backend = RedisFieldBackend(client, prefix(), clock=clock)
    redis_field = PheromoneField(backend, **policy)
    memory_field = PheromoneField(InMemoryFieldBackend(clock=clock), **policy)
    rng = random.Random(7)
    agents = [f"a{i}" for i in range(5)]
    for step in range(60):
        n = rng.choice([1, 20, 40])
        deposits = (
            [rng.choice(agents) for _ in range(n)],
            rng.choice(["work", "claim", "slow"]),
            [rng.uniform(-1.0, 1.0) for _ in range(n)],
            [rng.choice([None, *agents]) for _ in range(n)],
            [rng.choice([None, "r1"]) for _ in range(n)],
        )
        factor, leaving = rng.choice([0.5, 1.5]), rng.choice(agents)
        for field in (redis_field, memory_field):
            depositors, signal_type, intensities, targets, regions = deposits
            await field.deposit_many(
                depositors, signal_type, intensities, target_agent_ids=targets, regions=regions
            )
            if step % 5 == 1:
                await field.reinforce("r1", factor=factor)
        if step % 11 == 3:
            # decay() first: the backends count a removed signal that was already due differently
            assert await redis_field.decay() == await memory_field.decay(), step
            assert await redis_field.clear_agent(leaving) == await memory_field.clear_agent(leaving)
        clock.advance(rng.choice([0.25, 1.0, 2.5]))
        if step % 3 == 0:
            assert await redis_field.decay() == await memory_field.decay(), step
            assert await redis_field.signal_count() == await memory_field.signal_count(), step
        for agent in [None, *agents]:
            expected = await memory_field.read_pressure(agent)
            got = await redis_field.read_pressure(agent)
            assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9), (step, agent)
        expected_all = await memory_field.read_pressures()
        got_all = await redis_field.read_pressures()
        assert expected_all.keys() == got_all.keys()
        assert all(math.isclose(got_all[a], expected_all[a], rel_tol=1e-9, abs_tol=1e-9) for a in agents)
    clock.advance(100.0)
    assert await redis_field.decay() == await memory_field.decay()
    assert await redis_field.signal_count() == 0
    index = [await client.zcard(backend._keys[1]), await client.hlen(backend._keys[9])]
    sums = [await client.hlen(backend._keys[2]), await client.hlen(backend._keys[3])]
    assert (index, sums) == ([0, 0], [0, 0])
    if server != "fakeredis":
        await client.aclose()
