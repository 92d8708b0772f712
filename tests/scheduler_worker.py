"""One OS process of the many-worker test: run the shared task set, logging every dispatch in Redis.

Usage: python scheduler_worker.py URL LEDGER_NAME WORKER_ID TASKS SECONDS_PER_TASK
"""

from __future__ import annotations

import asyncio
import json
import sys

from redis.asyncio import Redis

from stigmergy import DispatchResult, StigmergyScheduler, TaskSpec
from stigmergy.backends.redis_ledger import RedisTaskLedger


def task_set(n: int) -> list[TaskSpec]:
    """A deterministic graph: each task waits on the one 40 before it and on the one at half its index."""
    tasks = []
    for i in range(n):
        deps = {f"t{j}" for j in (i - 40, i // 2) if 0 <= j < i}
        tasks.append(TaskSpec(f"t{i}", f"step {i}", f"agent-{i % 50}", dependencies=sorted(deps)))
    return tasks


async def main(url: str, name: str, worker: str, n: int, seconds: float) -> None:
    client = Redis.from_url(url)
    ledger = RedisTaskLedger(client, name, block=0.2)
    scheduler = StigmergyScheduler(ledger=ledger, worker_id=worker, lease=1.0, tick_interval=0.2)
    runs = f"{name}:runs"

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        await client.rpush(runs, f"{task.id}|{worker}")
        await client.incr(f"{name}:busy:{worker}")  # how many attempts this worker is in
        await asyncio.sleep(seconds)
        await client.decr(f"{name}:busy:{worker}")
        return DispatchResult(True, output=task.id)

    scheduler.set_dispatcher(dispatch)
    for task in task_set(n):
        await scheduler.add_task(task)
    summary = await scheduler.run()
    print(json.dumps({"ok": summary.ok, "done": len(summary.completed), "takeovers": scheduler.takeovers}))
    await client.aclose()


if __name__ == "__main__":
    url, name, worker, n, seconds = sys.argv[1:]
    asyncio.run(main(url, name, worker, int(n), float(seconds)))
