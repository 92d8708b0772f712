"""One OS process of the many-process test: deposit into a shared field, then report what it reads.

Usage: python redis_worker.py URL KEY_PREFIX WORKER_INDEX DEPOSITS PROCESSES
"""

from __future__ import annotations

import asyncio
import json
import sys

from stigmergy import ExponentialDecay, PheromoneField, StepDecay, backend_from_url


async def main(url: str, prefix: str, index: int, deposits: int, processes: int) -> None:
    field = PheromoneField(
        backend_from_url(f"{url}?key_prefix={prefix}"),
        ExponentialDecay(1e6),
        decay_by_type={"count": StepDecay(3600.0)},
    )
    async with field:
        half = deposits // 2
        for i in range(half):  # one at a time, interleaving with the other processes
            await field.deposit(f"worker-{index}", "count", 0.5, target_agent_id="sink", metadata={"i": i})
        await field.deposit_many(
            f"worker-{index}", "count", [0.5] * (deposits - half), target_agent_ids="sink"
        )
        await field.deposit(f"worker-{index}", "fading", 0.25)
        # The other processes are not ours to await: poll the shared field until all have written.
        while await field.signal_count() < processes * (deposits + 1):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        print(
            json.dumps(
                {
                    "count": await field.read_pressure("sink", signal_types=["count"]),
                    "fading": await field.read_pressure("sink", signal_types=["fading"]),
                    "signals": await field.signal_count(),
                }
            )
        )


if __name__ == "__main__":
    url, prefix, index, deposits, processes = sys.argv[1:]
    asyncio.run(main(url, prefix, int(index), int(deposits), int(processes)))
