"""Benchmark the LangGraph and CrewAI adapters against each framework on its own.

    python bench/integrations.py [--frameworks langgraph,crewai] [--timeout 60] [--json OUT.json]

Two workloads, every task a fake model call that sleeps (no network):

- four: four independent tasks of 0.5 s each (ideal makespan 0.5 s).
- thirty: 30 tasks of 0.05 to 0.4 s (seeded), each depending on up to two of the eight
  tasks before it; ideal makespan is its critical path.

Each workload runs on one agent per task, through:

- LangGraph: ours is ``StigmergyRouter``'s graph (the shared scheduler starts each
  task as its last dependency ends); the framework alone is the idiomatic
  ``StateGraph``, a node per task with an edge from each dependency (a node with
  several waits for all of them), which runs in supersteps: a superstep's nodes
  start together and the next superstep waits for its slowest node.
- CrewAI: ours is ``StigmergyManager``'s crew; the framework alone is the same
  tasks (dependencies as ``context``) in a sequential crew. Both with ``akickoff``.

Makespan is the wall time of the ``ainvoke``/``akickoff`` call; each run is cut off
after ``--timeout`` seconds. Printed per workload: the ideal, ours, the framework's,
framework / ours (how many times faster ours is) and ours / ideal (overhead). The
first run of each framework in the process pays one-off costs, so both sides get one
untimed warm-up run first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

for name, value in {
    "CREWAI_DISABLE_TELEMETRY": "true",  # CrewAI's telemetry and tracing would try the network
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
}.items():
    os.environ.setdefault(name, value)


@dataclass(frozen=True)
class Job:
    id: str
    seconds: float
    deps: tuple[str, ...] = ()


@dataclass
class Row:
    framework: str
    workload: str
    ideal: float
    ours: float
    alone: float

    @property
    def speedup(self) -> float:
        return self.alone / self.ours

    @property
    def overhead(self) -> float:
        return self.ours / self.ideal


def four() -> list[Job]:
    return [Job(f"t{n}", 0.5) for n in range(4)]


def thirty(seed: int = 7) -> list[Job]:
    rng = random.Random(seed)
    jobs: list[Job] = []
    for n in range(30):
        window = [j.id for j in jobs[-8:]]
        deps = tuple(rng.sample(window, k=min(len(window), rng.randint(0, 2))))
        jobs.append(Job(f"t{n}", round(rng.uniform(0.05, 0.4), 3), deps))
    return jobs


def critical_path(jobs: Sequence[Job]) -> float:
    finish: dict[str, float] = {}
    for job in jobs:  # dependencies come first
        finish[job.id] = job.seconds + max((finish[d] for d in job.deps), default=0.0)
    return max(finish.values())


async def timed(run: Callable[[], Awaitable[Any]], limit: float) -> float:
    """Seconds ``run()`` took; cut off after ``limit`` seconds."""
    start = time.perf_counter()
    await asyncio.wait_for(run(), limit)
    return time.perf_counter() - start


# -- LangGraph ------------------------------------------------------------------------------


def sleeper(seconds: float) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def node(state: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {}

    return node


def langgraph_ours(jobs: Sequence[Job]) -> Callable[[], Awaitable[Any]]:
    from stigmergy.integrations.langgraph import StigmergyRouter

    router = StigmergyRouter()
    for job in jobs:
        router.register_agent(f"agent-{job.id}", sleeper(job.seconds))
        router.add_task(job.id, f"agent-{job.id}", deps=list(job.deps))
    graph = router.build_graph()
    return lambda: graph.ainvoke({})


def langgraph_alone(jobs: Sequence[Job]) -> Callable[[], Awaitable[Any]]:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class Empty(TypedDict, total=False):
        done: int

    builder: Any = StateGraph(Empty)
    needed = {d for job in jobs for d in job.deps}
    for job in jobs:
        builder.add_node(job.id, sleeper(job.seconds))
        builder.add_edge(list(job.deps) if job.deps else START, job.id)
        if job.id not in needed:
            builder.add_edge(job.id, END)
    graph = builder.compile()
    return lambda: graph.ainvoke({})


# -- CrewAI ---------------------------------------------------------------------------------


def crew_agents(jobs: Sequence[Job]) -> dict[str, Any]:
    """One agent per job, whose fake LLM sleeps for that job's time."""
    from crewai import Agent
    from crewai.llms.base_llm import BaseLLM

    class Sleepy(BaseLLM):
        seconds: float

        def call(self, messages: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            time.sleep(self.seconds)
            return "Final Answer: done"

        async def acall(self, messages: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            await asyncio.sleep(self.seconds)
            return "Final Answer: done"

    return {
        job.id: Agent(
            role="worker", goal="work", backstory="b", llm=Sleepy(model="fake", seconds=job.seconds)
        )
        for job in jobs
    }


def crewai_ours(jobs: Sequence[Job]) -> Callable[[], Awaitable[Any]]:
    from stigmergy.integrations.crewai import StigmergyManager

    agents = crew_agents(jobs)
    manager = StigmergyManager()
    for job in jobs:
        manager.add_task(job.id, agents[job.id], f"job {job.id}", deps=list(job.deps))
    crew = manager.build_crew()
    run: Callable[[], Awaitable[Any]] = crew.akickoff
    return run


def crewai_alone(jobs: Sequence[Job]) -> Callable[[], Awaitable[Any]]:
    from crewai import Crew, Process, Task

    agents = crew_agents(jobs)
    tasks: dict[str, Task] = {}
    for job in jobs:
        context = [tasks[d] for d in job.deps]
        tasks[job.id] = Task(
            description=f"job {job.id}", expected_output="done", agent=agents[job.id], context=context or None
        )
    crew = Crew(agents=list(agents.values()), tasks=list(tasks.values()), process=Process.sequential)
    run: Callable[[], Awaitable[Any]] = crew.akickoff
    return run


BUILDERS = {
    "langgraph": (langgraph_ours, langgraph_alone),
    "crewai": (crewai_ours, crewai_alone),
}


async def measure(framework: str, limit: float) -> list[Row]:
    ours, alone = BUILDERS[framework]
    await timed(ours(four()), limit)  # warm-ups: imports and first-run costs
    await timed(alone(four()), limit)
    rows = []
    for workload, jobs in (("4 x 0.5 s, independent", four()), ("30 tasks with dependencies", thirty())):
        ideal = critical_path(jobs)
        ours_s = await timed(ours(jobs), limit)
        rows.append(Row(framework, workload, ideal, ours_s, await timed(alone(jobs), limit)))
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        f"{'framework':<10} {'workload':<27} {'ideal':>7} {'ours':>7} {'alone':>7} {'alone/ours':>11} "
        f"{'ours/ideal':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r.framework:<10} {r.workload:<27} {r.ideal:>6.2f}s {r.ours:>6.2f}s {r.alone:>6.2f}s "
            f"{r.speedup:>10.2f}x {r.overhead:>10.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default="langgraph,crewai", help="comma-separated: langgraph, crewai")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run is cut off")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for framework in args.frameworks.split(","):
        if framework not in BUILDERS:
            parser.error(f"unknown framework {framework!r}")
        rows.extend(asyncio.run(measure(framework, args.timeout)))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                [{**asdict(r), "speedup": r.speedup, "overhead": r.overhead} for r in rows], out, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
