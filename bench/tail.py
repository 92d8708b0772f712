"""Where a contention run's makespan goes beyond its bound: the schedule's fault, or the draws'.

    python bench/tail.py [--scenario spiky] [--mode transport proxy] [--repeats 5] [--seed 1]
                         [--speed 20] [--disable PRIMITIVE ...]

Runs ``bench/scenarios.py``'s scenario and splits each run's makespan ``M`` against its
bound ``B`` (the rate limit's: the admissions after the initial burst at ``rpm / 60`` per
second, plus one nominal latency) into what no schedule could avoid and the rest:

- tail: the mock draws each attempt's latency in arrival order, so the i-th admission's
  latency ``L_i`` is fixed by the seed whoever is admitted i-th. Admissions come no
  sooner than ``t_i = max(0, i - rpm) * 60 / rpm``, so no schedule ends before
  ``max_i (t_i + L_i)``: a spike among the last admissions adds up to ~9 s to ``B``.
- chain: an agent's calls are sequential, so it needs at least the sum of its calls'
  latencies (as they fell in this run: which agent drew the spikes depends on the order).
- inherent: the larger of the two, over ``B``; the rest of ``M - B`` is the schedule's.
  Also: the last admission against its earliest ``t_n``, and the agent that ended last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios as bench  # a sibling script, imported as bench/scenarios.py imports peers


@dataclass(frozen=True)
class Tail:
    """One run's makespan, its bound and the two schedule-independent floors above the bound."""

    seed: int
    makespan: float
    bound: float
    tail: float  # max_i (t_i + L_i): the latencies as drawn, at the fastest admissions
    chain: float  # the longest agent's sum of realised latencies
    last_admission: float  # seconds after the start
    earliest_last: float  # t_n: when the rate limit would have let the last one in
    last_agent: int  # whose call ended last
    last_agent_spikes: int

    @property
    def inherent(self) -> float:
        """Seconds over the bound no schedule avoids (the larger floor, less the bound)."""
        return max(0.0, max(self.tail, self.chain) - self.bound)

    @property
    def miss(self) -> float:
        return self.makespan - self.bound


def analyse(
    scenario: bench.Scenario,
    seed: int,
    calls: Sequence[bench.CallRecord],
    attempts: Sequence[bench.Attempt],
    start: float,
) -> Tail:
    """:class:`Tail` of one run from its raw records (times relative to ``start``)."""
    spacing = 60.0 / scenario.rpm
    admitted = sorted((a for a in attempts if a.ended is not None), key=lambda a: a.arrived)
    latencies = [(a.ended or a.arrived) - a.arrived for a in admitted]
    tail = max(
        (max(0, i + 1 - scenario.rpm) * spacing + latency for i, latency in enumerate(latencies)),
        default=0.0,
    )
    per_agent: dict[int, float] = {}
    spikes: dict[int, int] = {}
    for attempt, latency in zip(admitted, latencies, strict=True):
        agent = int(attempt.call.split("/")[0]) if "/" in attempt.call else -1
        per_agent[agent] = per_agent.get(agent, 0.0) + latency
        spikes[agent] = spikes.get(agent, 0) + (latency > 5 * scenario.latency)
    last = max(calls, key=lambda c: c.done or 0.0)
    metrics = bench.measure(scenario, calls, attempts, start)
    return Tail(
        seed=seed,
        makespan=metrics.makespan,
        bound=metrics.makespan_bound,
        tail=tail,
        chain=max(per_agent.values(), default=0.0),
        last_admission=(admitted[-1].arrived - start) if admitted else 0.0,
        earliest_last=max(0, len(admitted) - scenario.rpm) * spacing,
        last_agent=last.agent,
        last_agent_spikes=spikes.get(last.agent, 0),
    )


async def run(
    scenario: bench.Scenario, mode: str, seeds: Sequence[int], speed: float, disable: Sequence[str]
) -> list[tuple[Tail, bench.Metrics]]:
    out = []
    tails: list[Tail] = []
    for seed in seeds:

        def keep(calls: Sequence[bench.CallRecord], attempts: Sequence[bench.Attempt], start: float) -> None:
            tails.append(analyse(scenario, seed, calls, attempts, start))  # noqa: B023 (called in this pass)

        result = await bench.run_scenario(scenario, mode, seed, speed, disable=disable, on_records=keep)
        out.append((tails[-1], result.metrics))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    keys = [s.key for s in bench.SCENARIOS]
    parser.add_argument("--scenario", choices=keys, default="spiky")
    modes = list(bench.STIGMERGY_MODES)
    parser.add_argument("--mode", nargs="+", choices=modes, default=modes)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--disable", nargs="*", default=[], choices=bench.ABLATION, help="transport only")
    args = parser.parse_args(argv)
    scenario = next(s for s in bench.SCENARIOS if s.key == args.scenario)
    seeds = list(range(args.seed, args.seed + args.repeats))
    print(
        "| mode | seed | makespan / bound | net goodput | max/mean wait | tail floor | chain floor "
        "| inherent / miss | last admission (earliest) | ended last: agent (spikes) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.mode:
        rows = anyio.run(run, scenario, mode, seeds, args.speed, args.disable if mode == "transport" else [])
        for t, m in rows:
            share = t.inherent / t.miss if t.miss > 0 else 1.0
            print(
                f"| {mode} | {t.seed} | {t.makespan:.1f} / {t.bound:.1f} = x{m.makespan_ratio:.3f} "
                f"| {m.goodput_net:.1%} | {m.fair_share_max:.2f} | {t.tail:.1f} | {t.chain:.1f} "
                f"| {t.inherent:.1f} / {t.miss:.1f} s ({share:.0%}) "
                f"| {t.last_admission:.1f} ({t.earliest_last:.1f}) | {t.last_agent} ({t.last_agent_spikes}) |"
            )
        tails = [t for t, _ in rows]
        ms = [m for _, m in rows]
        inherent, miss = sum(t.inherent for t in tails), sum(max(0.0, t.miss) for t in tails)
        print(
            f"| {mode} | median | x{statistics.median(m.makespan_ratio for m in ms):.3f} "
            f"| {statistics.median(m.goodput_net for m in ms):.1%} "
            f"| {statistics.median(m.fair_share_max for m in ms):.2f} "
            f"| x{statistics.median(t.tail / t.bound for t in tails):.3f} "
            f"| x{statistics.median(t.chain / t.bound for t in tails):.3f} "
            f"| {inherent:.1f} / {miss:.1f} s in all ({inherent / miss if miss else 1.0:.0%}) | | |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
