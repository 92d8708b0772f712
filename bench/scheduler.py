"""Benchmark StigmergyScheduler: scheduling cost per task, makespan against the ideal, start latency.

    python bench/scheduler.py [--quick] [--repeats 3] [--backend asyncio|trio] [--json OUT.json]
    python bench/scheduler.py --peer [--peer-n 200] [--peer-timeout 60] [--json OUT.json]
    python bench/scheduler.py --n 50000 --workloads chain,wide [--timeout 300]

Four workloads, every one built and run through the API that ours shares with the
stigmergy-scheduler package (``StigmergyScheduler()`` with no arguments, ``set_dispatcher``,
``add_task``, ``run``, ``get_metrics``), so the same code runs on both:

- chain: 10k tasks, each depending on the one before, on agents ``a{i % 100}``; the
  dispatcher returns ``DispatchResult(True)`` at once. Ideal makespan 0, so the figure is
  the scheduling cost per task, makespan / n, and the delay from a dependency's dispatch
  end to its dependent's dispatch start (both stamped with ``time.perf_counter`` inside
  the dispatcher), median and p99.
- wide: 10k independent tasks over 100 agents, instant dispatch: makespan / n.
- llm-0.1: 120 independent tasks over 30 agents, each dispatch ``sleep(0.1)`` (a mock LLM
  call). At most one task per agent at a time, so the ideal makespan is 4 x 0.1 s.
- llm-0.5: 100 tasks over 20 agents, 0.5 s each: ideal 5 x 0.5 s.

Makespan is the wall time of ``await scheduler.run()``, from the call until it returns;
the ``add_task`` calls before it are timed apart ("add/task"). Before it, each worker runs
one instant task on a throwaway scheduler: the first ``run()`` in a process pays one-off
costs (imports) that are not scheduling; that warm-up's wall time is printed apart as
the cold start. "CPU/task" is the process's CPU time (``time.process_time``) during
``run()`` / n: for the LLM workloads, whose dispatches sleep, that is what scheduling
costs. The delay columns: for the chain, dependency end to dependent start; for the LLM
workloads ("handoff"), an agent's task ending to that agent's next task starting
(between one agent's tasks the loop serves the others). Every run is checked:
each task dispatched once, no dependent started before its dependency ended, no agent
running two tasks at once.

Targets (stated for 10k tasks), printed with PASS/MISS next to the figures:
scheduling cost <= 0.1 ms per task (chain and wide); p99 dependency-to-dependent start
<= 1 ms (chain); makespan <= 1.05 x ideal (both LLM workloads).

Each run is a fresh process: the script starts itself again as a worker
(``--worker ours|peer --workload NAME``) that prints its results as JSON. Ours runs
``--repeats`` times per workload and the run with the median makespan is reported.
``--backend trio`` runs ours under ``trio.run`` (the peer is asyncio-only).

``--peer`` also runs stigmergy-scheduler 0.2.0, the package ours replaces, in the same
run: it is installed once into its own venv (``--peer-venv``, default
``~/.cache/stigmergy-bench/stigmergy-scheduler-0.2.0``, reused when present; see
``bench/peers.py``) and its workers run with that venv's interpreter in isolated mode
(``python -I``: no PYTHONPATH, no script directory on ``sys.path``) from outside the repo,
since both packages import as ``stigmergy``. Each worker reports which file it imported.
The peer ticks once per ``tick_interval`` (1 s) and scans every task each tick, so its
chain and wide workloads run on ``--peer-n`` tasks (default 200; ours is then run on that
n too, for the ratios) and every peer workload is cut off after ``--peer-timeout``
seconds: a cut-off run reports how many tasks completed, and its ratios are lower bounds
(">=").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PEER_PACKAGE = "stigmergy-scheduler"
PEER_VERSION = "0.2.0"
OURS_PACKAGE = "stigmergy-field"
REPO = Path(__file__).resolve().parent.parent

TARGET_COST_S = 100e-6  # scheduling cost per task, chain and wide, at 10k
TARGET_DEP_P99_S = 1e-3  # p99 dependency-to-dependent start, chain
TARGET_MAKESPAN_RATIO = 1.05  # makespan / ideal, LLM workloads
TARGET_N = 10_000
PEER_TICK_S = 1.0  # stigmergy-scheduler's default tick_interval: it dispatches only on ticks

WATCHDOG_GRACE_S = 15.0  # a worker whose loop will not give up the CPU is ended this long after its timeout
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Workload:
    name: str
    n: int
    agents: int
    latency: float  # seconds each dispatch takes; 0 = returns at once
    chain: bool = False

    @property
    def ideal(self) -> float:
        """Makespan with zero scheduling cost and one task per agent at a time."""
        if self.chain:
            return self.n * self.latency
        return math.ceil(self.n / self.agents) * self.latency

    @property
    def instant(self) -> bool:
        return self.latency == 0

    @property
    def title(self) -> str:
        if self.instant:
            kind = "chain" if self.chain else "wide"
            return f"{kind}, {self.n:,} tasks / {self.agents} agents, instant"
        return f"llm, {self.n} tasks / {self.agents} agents x {self.latency:g} s"


WORKLOADS: dict[str, Workload] = {
    "chain": Workload("chain", TARGET_N, 100, 0.0, chain=True),
    "wide": Workload("wide", TARGET_N, 100, 0.0),
    "llm-0.1": Workload("llm-0.1", 120, 30, 0.1),
    "llm-0.5": Workload("llm-0.5", 100, 20, 0.5),
}
SCALED = ("chain", "wide")  # the workloads whose n --quick and --peer-n change


# -- the worker: one workload, one implementation, one process ---------------------------------


def percentiles(values: list[float]) -> dict[str, Any]:
    """count, median, p99 and max of ``values`` (linear interpolation, as numpy's default)."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = (len(ordered) - 1) * q
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {"count": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": ordered[-1]}


def analyse(workload: Workload, records: list[tuple[str, str, float, float]], t0: float) -> dict[str, Any]:
    """Delays and checks from the dispatcher's (task id, agent id, start, end) stamps."""
    first: dict[str, tuple[float, float]] = {}
    by_agent: dict[str, list[tuple[float, float]]] = {}
    for task_id, agent_id, start, end in records:
        first.setdefault(task_id, (start, end))
        by_agent.setdefault(agent_id, []).append((start, end))
    dep_delays: list[float] = []
    if workload.chain:
        for i in range(1, workload.n):
            dependent, dependency = first.get(f"t{i}"), first.get(f"t{i - 1}")
            if dependent is not None and dependency is not None:
                dep_delays.append(dependent[0] - dependency[1])
    handoffs: list[float] = []
    for spans in by_agent.values():
        spans.sort()
        handoffs.extend(spans[k + 1][0] - spans[k][1] for k in range(len(spans) - 1))
    return {
        "completed": len(first),
        "dispatches": len(records),
        "first_start_s": min((s for s, _ in first.values()), default=t0) - t0,
        "last_end_s": max((e for _, e in first.values()), default=t0) - t0,
        "dep_delay": percentiles(dep_delays),
        "handoff": percentiles(handoffs),
        "violations": {
            "duplicate_dispatches": len(records) - len(first),
            "dependent_before_dependency": sum(d < 0 for d in dep_delays),
            "agent_overlaps": sum(h < 0 for h in handoffs),
        },
    }


def run_worker(impl: str, workload: Workload, timeout: float, backend: str) -> dict[str, Any]:
    """Run one workload on whichever ``stigmergy`` this interpreter imports; returns the results."""
    import importlib.metadata

    import stigmergy
    from stigmergy import DispatchResult, StigmergyScheduler, TaskSpec

    sleep: Callable[[float], Awaitable[Any]]
    if backend == "trio":
        import trio

        sleep = trio.sleep
    else:
        sleep = asyncio.sleep

    package = PEER_PACKAGE if impl == "peer" else OURS_PACKAGE
    info: dict[str, Any] = {
        "impl": impl,
        "package": package,
        "version": importlib.metadata.version(package),
        "module_file": stigmergy.__file__,
        "python": sys.version.split()[0],
        "backend": backend,
        "workload": workload.name,
        "n": workload.n,
        "agents": workload.agents,
        "latency_s": workload.latency,
        "chain": workload.chain,
        "ideal_s": workload.ideal,
        "timeout_s": timeout,
    }
    specs = [
        TaskSpec(
            id=f"t{i}",
            description=f"task {i}",
            agent_id=f"a{i % workload.agents}",
            dependencies=[f"t{i - 1}"] if workload.chain and i else [],
        )
        for i in range(workload.n)
    ]
    records: list[tuple[str, str, float, float]] = []
    latency = workload.latency

    async def dispatch(agent_id: str, task: TaskSpec) -> DispatchResult:
        start = time.perf_counter()
        if latency:
            await sleep(latency)
        records.append((task.id, agent_id, start, time.perf_counter()))
        return DispatchResult(True)

    clock: dict[str, float] = {}

    def results(ended_by: str, run_returned: bool, metrics: Any = None) -> dict[str, Any]:
        t0 = clock["t0"]
        out = dict(info)
        out.update(analyse(workload, records.copy(), t0))
        out["ended_by"] = ended_by
        out["run_returned"] = run_returned
        out["finished"] = run_returned and out["completed"] == workload.n
        out["makespan_s"] = clock.get("makespan", time.perf_counter() - t0)
        out["cpu_s"] = clock.get("cpu", time.process_time() - clock["cpu0"])
        out["add_s"] = clock["add"]
        if metrics is not None:
            out["metrics"] = {
                k: getattr(metrics, k)
                for k in ("total_ticks", "total_dispatches", "total_completions", "total_failures")
            }
            out["metrics"]["pending_tasks"] = metrics.pending_tasks
        return out

    def watchdog() -> None:  # the loop did not give up the CPU in time: report what we have and go
        print(RESULT_PREFIX + json.dumps(results("watchdog", False)), flush=True)
        os._exit(0)

    async def warm_up() -> None:
        """One instant task on a throwaway scheduler: the first run() in a process pays for imports."""

        async def instant(agent_id: str, task: TaskSpec) -> DispatchResult:
            return DispatchResult(True)

        scheduler = StigmergyScheduler()
        scheduler.set_dispatcher(instant)
        await scheduler.add_task(TaskSpec(id="warm-up", description="warm-up", agent_id="warm-up"))
        start = time.perf_counter()
        await bounded(scheduler.run, timeout, backend)
        info["cold_run_s"] = time.perf_counter() - start

    async def main() -> dict[str, Any]:
        await warm_up()
        scheduler = StigmergyScheduler()
        scheduler.set_dispatcher(dispatch)
        start = time.perf_counter()
        for spec in specs:
            await scheduler.add_task(spec)
        clock["add"] = time.perf_counter() - start
        timer = threading.Timer(timeout + WATCHDOG_GRACE_S, watchdog)
        timer.daemon = True
        timer.start()
        clock["cpu0"] = time.process_time()
        clock["t0"] = time.perf_counter()
        returned = await bounded(scheduler.run, timeout, backend)
        clock["makespan"] = time.perf_counter() - clock["t0"]
        clock["cpu"] = time.process_time() - clock["cpu0"]
        timer.cancel()
        return results("run returned" if returned else "timeout", returned, scheduler.get_metrics())

    if backend == "trio":
        import trio

        return trio.run(main)  # type: ignore[no-any-return]
    return asyncio.run(main())


async def bounded(run: Callable[[], Awaitable[Any]], seconds: float, backend: str) -> bool:
    """Await ``run()`` for at most ``seconds``; True if it returned."""
    if backend == "trio":
        import trio

        with trio.move_on_after(seconds) as scope:
            await run()
        return not scope.cancelled_caught
    try:
        await asyncio.wait_for(run(), seconds)
    except TimeoutError:
        return False
    return True


# -- the driver ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def spawn(impl: str, workload: Workload, timeout: float, backend: str, python: Path | None) -> dict[str, Any]:
    """Run one workload in a fresh worker process and return its results."""
    script = str(Path(__file__).resolve())
    args = ["--worker", impl, "--workload", workload.name, "--n", str(workload.n)]
    args += ["--timeout", str(timeout), "--backend", backend]
    if impl == "peer":
        assert python is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        command, cwd = [str(python), "-I", script, *args], python.parent.parent.parent
    else:
        env, command, cwd = dict(os.environ), [sys.executable, script, *args], None
    hard_limit = timeout + WATCHDOG_GRACE_S + 60  # startup, add_task, the watchdog's grace
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=hard_limit)
    except subprocess.TimeoutExpired:
        return {
            "impl": impl,
            "workload": workload.name,
            "n": workload.n,
            "error": f"killed after {hard_limit:g} s",
        }
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{impl} worker for {workload.name} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    in_peer_venv = python is not None and Path(result["module_file"]).is_relative_to(python.parent.parent)
    if (impl == "peer") != in_peer_venv:
        raise RuntimeError(f"the {impl} worker imported the wrong stigmergy: {result['module_file']}")
    return result


def median_run(
    impl: str, workload: Workload, timeout: float, backend: str, python: Path | None, repeats: int
) -> dict[str, Any]:
    """Run ``repeats`` times; the run with the median makespan, with every makespan attached."""
    runs = []
    for k in range(repeats):
        log(f"  {impl:<4} {workload.name:<8} n={workload.n:<6} run {k + 1}/{repeats}")
        runs.append(spawn(impl, workload, timeout, backend, python))
        if "error" in runs[-1] or not runs[-1]["finished"]:
            break  # a run that did not finish is not worth repeating
    runs.sort(key=lambda r: r.get("makespan_s", math.inf))
    chosen = dict(runs[len(runs) // 2])
    chosen["makespans_s"] = [r.get("makespan_s") for r in runs]
    return chosen


# -- figures ---------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == 0:
        return "0"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.2f} ms" if abs(seconds) < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.0f}x"
    return f"{ratio:.2f}x"


def cost(r: dict[str, Any]) -> float:
    return float(r["makespan_s"]) / r["n"]


def cpu_cost(r: dict[str, Any]) -> float:
    return float(r["cpu_s"]) / r["n"]


def span_ratio(r: dict[str, Any]) -> float:
    return float(r["makespan_s"]) / r["ideal_s"]


def unfinished(r: dict[str, Any]) -> str | None:
    """Why a run's figures are lower bounds, or None if it finished."""
    if "error" in r:
        return f"{r['error']} (nothing reported)"
    if r["finished"]:
        return None
    if r["run_returned"]:
        return f"run() returned with {r['completed']} of {r['n']} tasks completed"
    return f"did not finish in {r['timeout_s']:g} s (completed {r['completed']} of {r['n']})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """Plain-text table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def ours_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for r in results.values():
        workload = WORKLOADS[r["workload"]]
        if "error" in r:
            rows.append([replace(workload, n=r["n"]).title, r["error"], *["-"] * 6])
            continue
        instant = workload.instant
        delay = r["dep_delay"] if workload.chain else r["handoff"]
        rows.append(
            [
                replace(workload, n=r["n"]).title,
                fmt_time(r["makespan_s"]) + ("" if r["finished"] else " (cut off)"),
                "-" if instant else f"{fmt_time(r['ideal_s'])} / {span_ratio(r):.3f}x",
                fmt_time(cost(r)) if instant else "-",
                fmt_time(cpu_cost(r)),
                fmt_time(r["add_s"] / r["n"]),
                fmt_time(delay["p50"]) if workload.chain or not instant else "-",
                fmt_time(delay["p99"]) if workload.chain or not instant else "-",
            ]
        )
    header = [
        "workload",
        "makespan",
        "ideal / ratio",
        "cost/task",
        "CPU/task",
        "add/task",
        "delay p50",
        "p99",
    ]
    return table(header, rows)


def target_lines(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(target, figure, met) for each target on the runs at hand."""
    out: list[tuple[str, str, bool]] = []
    for name, r in results.items():
        if "error" in r:
            continue
        ok = bool(r["finished"])
        if name in ("chain", "wide"):
            out.append(
                (
                    f"{name}: scheduling cost per task <= 0.1 ms",
                    fmt_time(cost(r)),
                    ok and cost(r) <= TARGET_COST_S,
                )
            )
        if name == "chain":
            p99 = r["dep_delay"]["p99"]
            met = ok and p99 is not None and p99 <= TARGET_DEP_P99_S
            out.append(("chain: p99 dependency -> dependent start <= 1 ms", fmt_time(p99), met))
        if name.startswith("llm"):
            met = ok and span_ratio(r) <= TARGET_MAKESPAN_RATIO
            out.append((f"{name}: makespan <= 1.05 x ideal", f"{span_ratio(r):.3f}x", met))
    return out


def compare_rows(ours: dict[str, Any], peer: dict[str, Any]) -> list[list[str]]:
    """Rows of (workload, metric, ours, peer, peer/ours); lower bounds marked >= for cut-off peer runs."""
    workload = replace(WORKLOADS[ours["workload"]], n=ours["n"])
    why = unfinished(peer)
    bound = ">= " if why else ""
    metrics: list[tuple[str, Callable[[dict[str, Any]], float | None], bool, Callable[[float], str]]] = []
    if workload.instant:
        metrics.append(("cost/task", cost, True, fmt_time))
    else:
        metrics.append(("makespan / ideal", span_ratio, True, lambda x: f"{x:.3f}x"))
    metrics.append(("CPU/task", cpu_cost, True, fmt_time))
    if workload.chain:
        metrics.append(("p99 dep -> dependent", lambda r: r["dep_delay"]["p99"], False, fmt_time))
    elif not workload.instant:
        metrics.append(("p99 handoff", lambda r: r["handoff"]["p99"], False, fmt_time))
    rows = []
    for label, get, is_bound, fmt in metrics:
        mine = get(ours)
        if "error" in peer:
            rows.append([workload.title, label, fmt(mine) if mine is not None else "-", peer["error"], "-"])
            continue
        theirs = get(peer)
        prefix = bound if is_bound else ""
        note = f" (on {peer['completed']} tasks)" if why and not is_bound else ""
        ratio = "-" if mine is None or theirs is None or mine <= 0 else prefix + fmt_ratio(theirs / mine)
        shown = "-" if theirs is None else prefix + fmt(theirs) + note
        rows.append([workload.title, label, "-" if mine is None else fmt(mine), shown, ratio])
    return rows


def check_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            continue
        bad = {k: v for k, v in r["violations"].items() if v}
        if bad:
            lines.append(
                f"  {r['impl']} {r['workload']} n={r['n']}: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            )
        if r["run_returned"] and r["completed"] != r["n"]:
            lines.append(
                f"  {r['impl']} {r['workload']}: run() returned with {r['completed']} of {r['n']} tasks run"
            )
    return lines


def source_state() -> str:
    """Our checkout's commit, and whether the scheduler's sources have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "stigmergy", "backends"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes in stigmergy/ or backends/" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="chain and wide on 1,000 tasks (peer: 50)")
    parser.add_argument("--n", type=int, help="tasks in chain and wide (default 10000, quick 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each of ours; the median is reported")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each run of ours may take")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio", help="ours only")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    parser.add_argument("--peer", action="store_true", help=f"also run {PEER_PACKAGE} {PEER_VERSION}")
    parser.add_argument(
        "--peer-n", type=int, help="tasks in chain and wide for the peer (default 200, quick 50)"
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=60.0, help="seconds each peer workload may take"
    )
    parser.add_argument(
        "--peer-venv", type=Path, help=f"default ~/.cache/stigmergy-bench/{PEER_PACKAGE}-{PEER_VERSION}"
    )
    parser.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        workload = replace(WORKLOADS[args.workload], n=args.n or WORKLOADS[args.workload].n)
        result = run_worker(args.worker, workload, args.timeout, args.backend)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    names = [w for w in args.workloads.split(",") if w]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    n = args.n or (1000 if args.quick else TARGET_N)
    peer_n = args.peer_n or (50 if args.quick else 200)
    sized = {name: replace(WORKLOADS[name], n=n) if name in SCALED else WORKLOADS[name] for name in names}

    log(f"ours ({args.backend}), {args.repeats} run(s) per workload")
    ours = {
        name: median_run("ours", w, args.timeout, args.backend, None, args.repeats)
        for name, w in sized.items()
    }
    ours_small: dict[str, dict[str, Any]] = {}
    peer: dict[str, dict[str, Any]] = {}
    python: Path | None = None
    if args.peer:
        # imported here: the peer's workers run this file with no bench/ on sys.path
        from peers import peer_venv

        python = peer_venv(PEER_PACKAGE, PEER_VERSION, args.peer_venv)
        for name in names:
            if name in SCALED and peer_n != n:
                w = replace(WORKLOADS[name], n=peer_n)
                ours_small[name] = median_run("ours", w, args.timeout, args.backend, None, args.repeats)
        limit = f"at most {args.peer_timeout:g} s each"
        log(f"peer ({PEER_PACKAGE} {PEER_VERSION}, asyncio), one run per workload, {limit}")
        for name in names:
            w = replace(WORKLOADS[name], n=peer_n) if name in SCALED else WORKLOADS[name]
            peer[name] = median_run("peer", w, args.peer_timeout, "asyncio", python, 1)

    first = next(r for r in ours.values() if "error" not in r)
    print(f"Scheduler benchmark: Python {first['python']} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"ours: {OURS_PACKAGE} {first['version']} ({source_state()}), {args.backend}, "
        f"median of {args.repeats} run(s); default settings (StigmergyScheduler())"
    )
    print()
    print(ours_table(ours))
    print()
    print("cost/task = makespan / n (instant dispatch; ideal makespan 0).")
    print("CPU/task = the process's CPU time during run() / n.")
    print("delay: chain = dependency's dispatch end -> dependent's dispatch start; llm = an agent's task end")
    print("-> its next task's start. add/task = add_task() before run(), not in the makespan.")
    colds = [r["cold_run_s"] for r in ours.values() if "cold_run_s" in r]
    if colds:
        cold = fmt_time(max(colds))
        print(f"Cold start (first run() in a fresh process, one instant task; not in the figures): {cold}")
    print()
    targets = target_lines(ours)
    if targets:
        print("Targets" + ("" if n == TARGET_N else f" (stated for {TARGET_N:,} tasks; this run used {n:,})"))
        width = max(len(t) for t, _, _ in targets)
        for text, figure, met in targets:
            print(f"  {text.ljust(width)}  {figure:>10}  {'PASS' if met else 'MISS'}")
        print()
    for r in ours.values():
        why = unfinished(r)
        if why:
            print(f"ours {r['workload']}: {why}")

    rows: list[list[str]] = []
    if args.peer:
        for name in names:
            rows += compare_rows(ours_small.get(name, ours[name]), peer[name])
        p = next((r for r in peer.values() if "error" not in r), None)
        version = p["version"] if p else PEER_VERSION
        cut = f"cut off after {args.peer_timeout:g} s"
        print(f"Peer: {PEER_PACKAGE} {version}, asyncio, one run per workload, {cut}")
        if peer_n != n:
            hours = n * PEER_TICK_S / 3600  # the peer starts one step of a chain per tick
            print(
                f"(chain and wide on {peer_n} tasks for both: the peer starts one step of a chain per"
                f" {PEER_TICK_S:g} s tick, so the {n:,}-task chain alone would take about {hours:.1f} h)"
            )
        print()
        print(table(["workload", "metric", "ours", "peer", "peer/ours"], rows, text_columns=2))
        print()
        colds = [r["cold_run_s"] for r in peer.values() if "cold_run_s" in r]
        if colds:
            print(
                f"Peer cold start (first run() in a fresh process, one instant task): {fmt_time(max(colds))}"
            )
        for r in peer.values():
            why = unfinished(r)
            if why:
                print(f"peer {r['workload']} n={r['n']}: {why}; its figures are lower bounds (>=)")
        print()

    problems = check_lines([*ours.values(), *ours_small.values(), *peer.values()])
    print(
        "Checks (each task dispatched once, dependencies respected, one task per agent at a time): ", end=""
    )
    print("all passed" if not problems else "FAILED")
    for line in problems:
        print(line)

    if args.json:
        out = {
            "meta": {
                "python": first["python"],
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "backend": args.backend,
                "repeats": args.repeats,
                "source": source_state(),
            },
            "ours": ours,
            "ours_at_peer_n": ours_small,
            "peer": peer,
            "targets": [{"target": t, "figure": f, "met": m} for t, f, m in targets],
            "comparison": [
                dict(zip(["workload", "metric", "ours", "peer", "ratio"], r, strict=True)) for r in rows
            ],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
