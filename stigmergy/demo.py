"""``stigmergy demo``: twenty agents, one rate-limited API, without and with the field.

Everything runs in this process: the mock provider (``MockLLMAPI``, with a tight
requests-per-minute limit, 502s and connection resets) is reached through
``httpx.ASGITransport``, and time runs ``speed`` times faster for the mock, the gate
and the agents alike (one :class:`AcceleratedClock`), so a few minutes of traffic
take well under a minute. No keys, no server.

- **Uncoordinated**: each agent calls the API directly with the official SDKs'
  default retry policy (two retries for 408/409/429/5xx and connection errors,
  waiting ``retry-after`` when it is at most 60 s, else ``min(0.5 * 2**n, 8)`` s with
  jitter). An agent whose call still fails gives up: it died.
- **Through stigmergy**: the same agents send through :class:`StigmergyTransport`
  on one :class:`Gate`; they never retry themselves.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from stigmergy.clock import AcceleratedClock
from stigmergy.errors import ConfigurationError
from stigmergy.gate import Gate
from stigmergy.integrations.httpx_transport import StigmergyTransport
from stigmergy.mock_api import MockConfig, MockLLMAPI
from stigmergy.sdk_retry import sdk_call

PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults take about half a minute per run."""

    agents: int = 20
    calls: int = 3  # per agent
    rpm: int = 20
    speed: float = 8.0
    p502: float = 0.05
    p_reset: float = 0.03
    ttft: float = 1.0  # mock seconds to the first token
    seed: int = 7

    def __post_init__(self) -> None:
        for name in ("agents", "calls", "rpm"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.speed > 0:
            raise ConfigurationError(f"--speed must be > 0, got {self.speed}")


@dataclass
class RunResult:
    """One run, as the final table shows it; ``samples`` are :class:`Sample` rows for the plot."""

    name: str
    calls: int
    completed: int = 0
    failed: int = 0
    dead: int = 0
    attempts: int = 0
    rate_limited: int = 0
    wasted_tokens: int = 0
    makespan: float = 0.0
    goodput: float = 0.0
    status: dict[str, str] = field(default_factory=dict)
    outstanding: int = 0  # calls asked for and not yet answered
    queued: int = 0  # of those, not at the API: waiting in the gate, or sleeping before a retry
    pressure: float = 0.0  # the share of its rate-limit window the API has used
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """The run at one moment (API seconds since its start)."""

    t: float
    outstanding: int
    queued: int
    upstream: int  # calls the mock is serving
    completed: int
    rate_limited: int
    pressure: float


def _payload(agent: int, call: int) -> dict[str, Any]:
    question = f"agent {agent}, step {call}: summarise the findings so far. " * 4
    return {"model": "mock-model", "max_tokens": 32, "messages": [{"role": "user", "content": question}]}


async def _run(
    name: str,
    settings: DemoSettings,
    call: Callable[[int, int, AcceleratedClock, MockLLMAPI], Awaitable[bool]],
    on_sample: Callable[[RunResult, float], None] | None,
    setup: Callable[[AcceleratedClock, MockLLMAPI], None],
) -> RunResult:
    clock = AcceleratedClock(settings.speed)
    config = MockConfig(
        rpm=settings.rpm, p502=settings.p502, p_reset=settings.p_reset, ttft=settings.ttft, seed=settings.seed
    )
    mock = MockLLMAPI(config, clock=clock, wall_clock=clock.wall, sleep=clock.sleep)
    setup(clock, mock)
    result = RunResult(name, settings.agents * settings.calls)
    start = clock()

    async def agent(n: int) -> None:
        key = f"agent-{n:02d}"
        for step in range(settings.calls):
            result.status[key] = f"call {step + 1}"
            result.outstanding += 1
            try:
                ok = await call(n, step, clock, mock)
            finally:
                result.outstanding -= 1
            if not ok:
                result.failed += 1
                result.dead += 1
                result.status[key] = "died"
                return
            result.completed += 1
        result.status[key] = "done"

    async def sample() -> None:
        while True:
            stats = mock.stats
            result.rate_limited, result.pressure = stats.rate_limited, mock.used()
            result.queued = max(0, result.outstanding - stats.in_flight)
            result.samples.append(
                Sample(
                    clock() - start,
                    result.outstanding,
                    result.queued,
                    stats.in_flight,
                    result.completed,
                    result.rate_limited,
                    result.pressure,
                )
            )
            if on_sample is not None:
                on_sample(result, clock() - start)
            await clock.sleep(0.5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        async with anyio.create_task_group() as agents:
            for n in range(settings.agents):
                agents.start_soon(agent, n)
        tg.cancel_scope.cancel()
    stats = mock.stats
    result.makespan = clock() - start
    result.attempts, result.rate_limited = stats.attempts, stats.rate_limited
    prompt = math.ceil(len(_payload(0, 0)["messages"][0]["content"]) / 4)
    result.wasted_tokens = stats.resets * prompt  # charged, never answered
    allowed = settings.rpm * (1 + result.makespan / 60)  # a full bucket, then its refill
    result.goodput = result.completed / allowed
    return result


async def run_both(
    settings: DemoSettings, on_sample: Callable[[RunResult, float], None] | None = None
) -> tuple[RunResult, RunResult]:
    """The uncoordinated run, then the one through stigmergy."""
    rng = random.Random(settings.seed)
    clients: dict[str, httpx.AsyncClient] = {}

    def direct(clock: AcceleratedClock, mock: MockLLMAPI) -> None:
        clients["direct"] = httpx.AsyncClient(transport=httpx.ASGITransport(app=mock), base_url="http://mock")

    async def call_direct(n: int, step: int, clock: AcceleratedClock, mock: MockLLMAPI) -> bool:
        payload = _payload(n, step)
        return await sdk_call(lambda: clients["direct"].post(PATH, json=payload), clock.sleep, rng)

    gates: dict[str, Gate] = {}

    def paced(clock: AcceleratedClock, mock: MockLLMAPI) -> None:
        gates["gate"] = gate = Gate(clock=clock)
        for n in range(settings.agents):
            transport = StigmergyTransport(
                httpx.ASGITransport(app=mock), gate=gate, agent_id=f"agent-{n:02d}"
            )
            clients[f"agent-{n}"] = httpx.AsyncClient(transport=transport, base_url="http://mock")

    async def call_paced(n: int, step: int, clock: AcceleratedClock, mock: MockLLMAPI) -> bool:
        response = await clients[f"agent-{n}"].post(PATH, json=_payload(n, step))
        return response.status_code < 400

    first = await _run("uncoordinated", settings, call_direct, on_sample, direct)
    second = await _run("through stigmergy", settings, call_paced, on_sample, paced)
    for client in clients.values():
        await client.aclose()
    return first, second


def table(results: tuple[RunResult, RunResult], settings: DemoSettings) -> str:
    """The side-by-side comparison the demo ends with."""
    rows: list[tuple[str, Callable[[RunResult], str]]] = [
        ("agents that died", lambda r: f"{r.dead} of {settings.agents}"),
        ("client-visible failures", lambda r: str(r.failed)),
        ("calls completed", lambda r: f"{r.completed} of {r.calls}"),
        ("upstream attempts", lambda r: str(r.attempts)),
        ("upstream 429s", lambda r: str(r.rate_limited)),
        ("wasted tokens", lambda r: str(r.wasted_tokens)),
        ("makespan (API seconds)", lambda r: f"{r.makespan:.0f}"),
        ("goodput, share of what the limit allowed", lambda r: f"{r.goodput:.0%}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  {results[0].name:>15}  {results[1].name:>18}"]
    lines += [f"{label:{width}}  {show(results[0]):>15}  {show(results[1]):>18}" for label, show in rows]
    return "\n".join(lines)


def plot(results: tuple[RunResult, RunResult], path: str) -> None:
    """Pressure, calls at the API and waiting, completions and 429s over time, both runs (matplotlib)."""
    try:
        importlib.import_module("matplotlib").use("Agg")  # files only, no window
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise ConfigurationError(
            f"--plot needs matplotlib: pip install 'stigmergy-field[bench]' ({exc})"
        ) from None
    panels: list[tuple[str, Callable[[Sample], float]]] = [
        ("pressure: share of the API's rate-limit window used", lambda s: s.pressure),
        ("calls at the API (in flight)", lambda s: s.upstream),
        ("calls waiting (in the gate, or before a retry)", lambda s: s.queued),
        ("calls completed", lambda s: s.completed),
        ("upstream 429s", lambda s: s.rate_limited),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 11), sharex=True)
    for axis, (title, column) in zip(axes, panels, strict=True):
        for result in results:
            axis.plot([s.t for s in result.samples], [column(s) for s in result.samples], label=result.name)
        axis.set_title(title)
        axis.legend()
    axes[-1].set_xlabel("API seconds")
    figure.tight_layout()
    figure.savefig(path)


def run_demo(settings: DemoSettings | None = None, plot_path: str | None = None, live: bool = True) -> int:
    """Run both, show progress (with rich, when on a terminal), print the table; 0 on success."""
    settings = settings or DemoSettings()
    print(
        f"{settings.agents} agents x {settings.calls} calls, one API at {settings.rpm} requests/minute "
        f"with {settings.p502:.0%} 502s and {settings.p_reset:.0%} connection resets "
        f"(time runs {settings.speed:g}x faster, in this process)"
    )
    with _progress(live) as on_sample:
        results = anyio.run(run_both, settings, on_sample)
    print(table(results, settings))
    if plot_path:
        plot(results, plot_path)
        print(f"plot written to {plot_path}")
    return 0


class _progress:
    """A live line per run on a terminal (rich), nothing otherwise."""

    def __init__(self, live: bool) -> None:
        self._live: Any = None
        if live:
            try:
                from rich.console import Console
                from rich.live import Live
            except ImportError:
                return
            console = Console()
            if console.is_terminal:
                self._live = Live(console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> Callable[[RunResult, float], None] | None:
        if self._live is None:
            return None
        self._live.__enter__()
        return self._update

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _update(self, result: RunResult, t: float) -> None:
        glyph = {"done": "[green]●[/]", "died": "[red]✗[/]"}
        agents = " ".join(glyph.get(s, "[yellow]…[/]") for _, s in sorted(result.status.items()))
        at_api = result.outstanding - result.queued
        self._live.update(
            f"[bold]{result.name}[/]  t={t:5.0f}s  done {result.completed}/{result.calls}  "
            f"window used {result.pressure:4.0%}  at the API {at_api}  waiting {result.queued}  "
            f"429s {result.rate_limited}  died {result.dead}\n{agents}"
        )
