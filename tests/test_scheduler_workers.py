"""Many schedulers, one task set: the Redis task ledger on a real redis-server.

In-process tests run two schedulers side by side; the last one starts four OS
processes and kills one with SIGKILL mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from stigmergy import (
    BackendUnavailableError,
    DispatchResult,
    DuplicateTaskError,
    RunSummary,
    StigmergyScheduler,
    TaskSpec,
)
from stigmergy.backends.redis_ledger import KEY_SUFFIXES, RedisTaskLedger

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio-only


@pytest.fixture
def ledger_name(redis_url: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    with SyncRedis.from_url(redis_url) as client:
        client.delete(*(f"stigmergy:{{{name}}}:{key}" for key in KEY_SUFFIXES), f"{name}:runs")


def worker(
    redis_url: str, name: str, worker_id: str, runs: list[tuple[str, str]], **settings: float
) -> StigmergyScheduler:
    ledger = RedisTaskLedger(Redis.from_url(redis_url), name, block=0.05)
    scheduler = StigmergyScheduler(ledger=ledger, worker_id=worker_id, tick_interval=0.05, **settings)

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        runs.append((task.id, worker_id))
        await anyio.sleep(0.001)
        return DispatchResult(True, output=f"{task.id}@{worker_id}")

    scheduler.set_dispatcher(dispatch)
    return scheduler


def graph(n: int) -> list[TaskSpec]:
    return [
        TaskSpec(f"t{i}", "", f"agent-{i % 5}", dependencies=[f"t{j}" for j in (i - 5, i // 3) if 0 <= j < i])
        for i in range(n)
    ]


async def test_two_workers_share_one_task_set_and_run_each_task_once(
    redis_url: str, ledger_name: str
) -> None:
    runs: list[tuple[str, str]] = []
    workers = [worker(redis_url, ledger_name, f"w{k}", runs) for k in range(2)]
    summaries: dict[str, RunSummary] = {}

    async def run(k: int) -> None:
        for task in graph(60):
            await workers[k].add_task(task)  # both add the same tasks: publishing is idempotent
        summaries[f"w{k}"] = await workers[k].run()

    async with anyio.create_task_group() as tg:
        for k in range(2):
            tg.start_soon(run, k)
    counts = Counter(task_id for task_id, _ in runs)
    assert set(counts) == {f"t{i}" for i in range(60)} and set(counts.values()) == {1}
    for summary in summaries.values():
        assert summary.ok
        assert {o.output for o in summary.outcomes.values()} == {f"{t}@{w}" for t, w in runs}
    order = {task_id: n for n, (task_id, _) in enumerate(runs)}
    for task in graph(60):
        assert all(order[dep] < order[task.id] for dep in task.dependencies)


async def test_a_task_whose_worker_died_is_taken_over_when_its_lease_ends(
    redis_url: str, ledger_name: str
) -> None:
    runs: list[tuple[str, str]] = []
    scheduler = worker(redis_url, ledger_name, "survivor", runs)
    dead = RedisTaskLedger(Redis.from_url(redis_url), ledger_name)
    await scheduler.add_task(TaskSpec("orphan", "", "agent"))
    claim = await dead.claim("orphan", "dead-worker", lease=0.3)  # ... and then it dies
    assert claim.kind == "granted" and claim.attempt == 1
    events = scheduler.events()
    summary = await scheduler.run()
    assert summary.ok and runs == [("orphan", "survivor")]
    assert summary.outcomes["orphan"].attempts == 2  # the dead worker's attempt counts
    assert scheduler.takeovers == {"orphan": "dead-worker"}
    assert await dead.takeovers() == {"orphan": "dead-worker"}
    retried = [e async for e in events if e.kind == "task_retried"]
    assert retried and "'dead-worker' died mid-attempt" in (retried[0].error or "")
    await dead.aclose()


async def test_a_busy_task_is_not_run_while_its_lease_lives(redis_url: str, ledger_name: str) -> None:
    ledger = RedisTaskLedger(Redis.from_url(redis_url), ledger_name)
    assert (await ledger.claim("t", "a", lease=60)).kind == "granted"
    busy = await ledger.claim("t", "b", lease=60)
    assert busy.kind == "busy" and 59 < busy.retry_after <= 60
    assert not await ledger.renew("t", "b", 60) and await ledger.renew("t", "a", 60)
    assert await ledger.finish("t", "a", "completed", {"answer": 42})
    assert not await ledger.finish("t", "b", "completed", "again")
    final = await ledger.claim("t", "b", lease=60)
    assert (final.kind, final.status, final.payload) == ("final", "completed", {"answer": 42})
    await ledger.aclose()


async def test_the_same_id_with_a_different_spec_is_refused(redis_url: str, ledger_name: str) -> None:
    runs: list[tuple[str, str]] = []
    first, second = (worker(redis_url, ledger_name, f"w{k}", runs) for k in range(2))
    await first.add_task(TaskSpec("t", "write", "a"))
    await second.add_task(TaskSpec("t", "write", "a"))  # the same: fine
    with pytest.raises(DuplicateTaskError, match="different spec"):
        await second.add_task(TaskSpec("t", "something else", "a"))


async def test_an_unreachable_ledger_says_what_to_check() -> None:
    scheduler = StigmergyScheduler(ledger=RedisTaskLedger.from_url("redis://127.0.0.1:1/0"))
    with pytest.raises(BackendUnavailableError, match="check that the server is running"):
        await scheduler.add_task(TaskSpec("t", "", "a"))


def test_four_processes_one_killed_mid_run_every_task_completes(redis_url: str, ledger_name: str) -> None:
    n = 2000
    script = Path(__file__).with_name("scheduler_worker.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent)}
    procs = [
        subprocess.Popen(
            # w0, the one killed, is slow: it is surely mid-attempt when it dies.
            [
                sys.executable,
                str(script),
                redis_url,
                ledger_name,
                f"w{k}",
                str(n),
                "0.05" if k == 0 else "0.002",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(4)
    ]
    client = SyncRedis.from_url(redis_url, decode_responses=True)
    runs_key = f"{ledger_name}:runs"
    deadline = time.monotonic() + 60
    try:
        # A quarter done, and w0 mid-attempt (its attempts take 50 ms; this polls every 1 ms).
        while client.llen(runs_key) < n // 4 or int(client.get(f"{ledger_name}:busy:w0") or 0) < 1:
            assert time.monotonic() < deadline, "the workers made no progress"
            assert procs[0].poll() is None, procs[0].communicate()[1]
            time.sleep(0.001)
        procs[0].send_signal(signal.SIGKILL)
        reports = []
        for proc in procs[1:]:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    states = client.hgetall(f"stigmergy:{{{ledger_name}}}:state")
    assert len(states) == n and all(v.startswith("completed\n") for v in states.values())
    assert all(r["ok"] and r["done"] == n for r in reports)

    runs = [entry.split("|") for entry in client.lrange(runs_key, 0, -1)]
    counts = Counter(task_id for task_id, _ in runs)
    assert set(counts) == {f"t{i}" for i in range(n)}  # nothing lost
    twice = {task_id for task_id, c in counts.items() if c > 1}
    takeovers = client.hgetall(f"stigmergy:{{{ledger_name}}}:takeovers")
    # Only tasks that the killed worker was running ran again, and each was reported.
    assert takeovers and twice <= set(takeovers) and set(takeovers.values()) == {"w0"}
    assert all(c == 2 for task_id, c in counts.items() if task_id in twice)
    for task_id in twice:
        assert next(who for t, who in runs if t == task_id) == "w0"
    reported = {task_id for r in reports for task_id in r["takeovers"]}
    assert reported == set(takeovers)
    client.close()
