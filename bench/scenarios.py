"""Contention scenarios: agents sharing one rate-limited, faulty API, with and without the field.

    python bench/scenarios.py [--quick] [--speed 50] [--repeats 3] [--seed 1]
                              [--scenario KEY ...] [--mode MODE ...] [--ablation]
                              [--json OUT.json] [--plot DIR] [--readme]
    python bench/scenarios.py --peers [--peer-scenarios KEY,...] [--peer-timeout S]
                              [--quick] [--seed 1] [--json OUT.json]

Every run serves the mock provider (:class:`MockLLMAPI`) over real TCP on 127.0.0.1, so
its connection resets are real RSTs, and the mock, the gate and the agents share one
:class:`AcceleratedClock` (``--speed``): minute-long windows pass in about a second.
Each agent makes its calls one after another (a third of them streamed, SSE; half
OpenAI-shaped, half Anthropic-shaped); an agent whose call fails client-side stops
(it *died*). Modes, the same agents and the same seeded faults in each:

- ``no-retry``: straight to the API, no retries.
- ``sdk-retries``: straight to the API with the official SDKs' default retry policy
  (:mod:`stigmergy.sdk_retry`, sleeping on the shared clock).
- ``transport``: through :class:`StigmergyTransport` on one :class:`Gate` (in-process).
- ``proxy``: through ``stigmergy proxy`` (:class:`ProxyApp` on a real port); the
  clients never retry.

Stigmergy is told what an operator would tell it: nothing about the rate limit (it
learns it from the headers), the API's concurrency cap as ``max_in_flight`` where the
scenario has one, and per-agent token budgets of four times what each agent needs.

Metrics (per run in the JSON; tables show medians over ``--repeats`` seeds). Times are
seconds on the shared clock; a call is *asked* when its agent starts it.

- failure rate: calls that failed client-side / calls asked (dead agents ask no more). A
  call fails client-side on an error status, a transport error, or a 200 whose body is
  not the whole reply the mock serves (*broken*: a stream cut short or carrying an error,
  as a proxy that has already sent its 200 must answer; an SDK would raise reading it,
  without retrying). The mock itself never sends one: it resets before its status line.
- agents dead: agents with a failed call.
- upstream 429s: what the mock answered 429 (from its own counters).
- wasted tokens: tokens the upstream charged for attempts whose answer never reached
  the client. The mock charges an attempt once admitted: a connection reset (injected
  after admission) is charged whatever the client does, so resets are the *floor*;
  replies cut short or served to a call that then failed are *avoidable*. The <= 1%
  verdict is on avoidable / all tokens charged; both parts are printed.
- makespan: first ask to the last call's end. Lower bound: the time the upstream's
  bucket needs to admit what it had to admit (completed calls + charged resets, less the
  initial burst of ``rpm``), at ``rpm / 60`` per second, plus one call's nominal latency
  (time to first token + tokens x token delay; a latency spike on the last call shows
  up as a miss).
- goodput: completed / what the limit allowed over the makespan, ``rpm * (1 +
  makespan / 60)``; *net*, the verdict, leaves out the limit the injected resets used:
  completed / (allowed - resets).
- wait: per call, from asking to the upstream receiving the attempt that answered it
  (back-off, failed attempts and the gate's queue included; the answer's own latency
  not). p99 over calls; fairness over agents: max of an agent's total wait / the mean
  agent's (target <= 2, "no agent waits more than twice its fair share") and Jain's index.

Targets (stigmergy modes, PASS/MISS; baselines are reported only): zero client-visible
failures; net goodput >= 95%; avoidable waste <= 1%; makespan <= 1.05 x its bound; no
agent over 2 x the mean wait.

``--ablation`` runs the transport mode with everything on, then once per primitive
switched off (``Gate(disable=...)``, and ``max_retries=0`` for retries), on the first
seed only (nine variants per scenario: minutes, not an hour). :func:`run_scenario` is the
entry point for other runners; ``external_proxy`` puts any proxy (say another project's,
in real time) in front of the mock.

``--peers`` runs instead the peers of issue 8, each installed into a venv of its own by
``bench/peers.py``: hivemind-scheduler's proxy and ours (``stigmergy proxy``), each a
process of its own told the scenario's limits, on quick-sized scenarios (default
:data:`PEER_SCENARIOS`), one seed, at speed 1: hivemind keeps real time, so it cannot share
the accelerated clock, and a run is cut off after ``--peer-timeout`` real seconds. The
clients are the proxy mode's (never retrying: a proxy's promise is that agents need not).
Then stigmergy-scheduler on the scheduler workloads (``bench/scheduler.py --peer``; with
``--quick`` its quick bench). Tables: both proxies' rows and hivemind / ours ratios; the
scheduler's peer / ours rows. About six minutes here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx

from stigmergy.budgets import TokenBudgets
from stigmergy.clock import AcceleratedClock
from stigmergy.errors import AdmissionError, ConfigurationError
from stigmergy.gate import PRIMITIVES, Gate
from stigmergy.integrations.httpx_transport import StigmergyTransport
from stigmergy.integrations.proxy import ProxyApp
from stigmergy.integrations.proxy_config import ProxyConfig
from stigmergy.integrations.proxy_server import serve_asgi
from stigmergy.mock_api import MockConfig, MockLLMAPI, count_input_tokens, reply_words, serve_mock
from stigmergy.sdk_retry import DEFAULT_RETRIES, sdk_call

MODES = ("no-retry", "sdk-retries", "transport", "proxy")
STIGMERGY_MODES = ("transport", "proxy")
#: Everything ``--ablation`` switches off in turn: the gate's primitives, then the transport's retries.
ABLATION = (*PRIMITIVES, "retries")
CALL_HEADER = "x-bench-call"  # "agent/step": lets the mock's log tie attempts to calls; forwarded untouched
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
OUTPUT_TOKENS = 8
MAX_TOKENS = 32
#: What every call's reply says, whole: the mock's text is the same for every call.
EXPECTED_TEXT = "".join(reply_words(min(MAX_TOKENS, OUTPUT_TOKENS)))
TOKEN_DELAY = 0.0  # tokens come at once: a sleep per token would overshoot ~1 ms each, x speed
FAIR_SHARE = 2.0
SAMPLE_EVERY = 1.0  # seconds on the shared clock
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Scenario:
    """One published contention scenario: who shares which API, and how it fails."""

    key: str
    title: str
    agents: int
    calls: int  # per agent, sized so demand spans about three rate-limit windows
    rpm: int
    p502: float = 0.0
    p529: float = 0.0
    p_reset: float = 0.0
    p_spike: float = 0.0  # calls 10x slower
    max_concurrency: int | None = None
    ttft: float = 1.0
    stream_share: float = 1 / 3

    @property
    def planned(self) -> int:
        return self.agents * self.calls

    @property
    def latency(self) -> float:
        """One call's nominal latency: time to first token plus its tokens."""
        return self.ttft + OUTPUT_TOKENS * TOKEN_DELAY

    def mock_config(self, seed: int) -> MockConfig:
        return MockConfig(
            rpm=self.rpm,
            output_tokens=OUTPUT_TOKENS,
            p502=self.p502,
            p529=self.p529,
            p_reset=self.p_reset,
            ttft=self.ttft,
            token_delay=TOKEN_DELAY,
            p_spike=self.p_spike,
            max_concurrency=self.max_concurrency,
            seed=seed,
        )

    def quick(self) -> Scenario:
        """A smoke-sized copy: demand of about one and a half windows."""
        return replace(self, calls=max(1, math.ceil(1.5 * self.rpm / self.agents)))

    def deadline(self) -> float:
        """Seconds on the shared clock after which a run is cut off (its open calls fail)."""
        return 3 * 60 * self.planned / self.rpm + 120


SCENARIOS = (
    Scenario("50rpm-5", "5 agents, 50 RPM", 5, 30, 50),
    Scenario("50rpm-10", "10 agents, 50 RPM", 10, 15, 50),
    Scenario("50rpm-20", "20 agents, 50 RPM", 20, 8, 50),
    Scenario("50rpm-50", "50 agents, 50 RPM", 50, 3, 50),
    Scenario(
        "faulty-60rpm",
        "11 agents, 60 RPM, 8% 502s, 5% resets, cap 5",
        11,
        16,
        60,
        p502=0.08,
        p_reset=0.05,
        max_concurrency=5,
    ),
    Scenario(
        "faulty-20rpm",
        "20 agents, 20 RPM, 10% errors, 10% spikes, cap 3",
        20,
        4,
        20,
        p502=0.04,
        p529=0.03,
        p_reset=0.03,
        p_spike=0.1,
        max_concurrency=3,
    ),
    Scenario("spiky", "10 agents, 50 RPM, 20% latency spikes", 10, 15, 50, p_spike=0.2),
)


# --- what happened ------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One call as its agent saw it."""

    agent: int
    step: int
    asked: float
    done: float | None = None
    ok: bool = False
    broken: bool = False  # failed on a 200 whose body was not the whole reply

    @property
    def ident(self) -> str:
        return f"{self.agent}/{self.step}"


@dataclass
class Attempt:
    """One attempt as the upstream saw it: ``status`` None means no answer (a reset)."""

    call: str
    arrived: float
    status: int | None = None
    complete: bool = False  # the whole body was sent
    input_tokens: int = 0
    output_tokens: int = 0  # of a complete success
    ended: float | None = None  # when the upstream was done with it


class RecordingMock(MockLLMAPI):
    """The mock provider, keeping a log of every model-call attempt on the shared clock."""

    def __init__(self, config: MockConfig, clock: AcceleratedClock) -> None:
        super().__init__(config, clock=clock, wall_clock=clock.wall, sleep=clock.sleep)
        self.clock = clock
        self.log: list[Attempt] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS.values():
            await super().__call__(scope, receive, send)
            return
        headers = dict(scope["headers"])
        attempt = Attempt(headers.get(CALL_HEADER.encode(), b"-").decode(), self.clock())
        self.log.append(attempt)
        body = bytearray()

        async def receive_recorded() -> Any:
            message = await receive()
            body.extend(message.get("body", b""))
            return message

        async def send_recorded(message: Any) -> None:
            if message["type"] == "http.response.start":
                attempt.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                attempt.complete = True
            await send(message)

        try:
            await super().__call__(scope, receive_recorded, send_recorded)
        finally:
            attempt.ended = self.clock()
            payload = json.loads(body or b"{}")
            attempt.input_tokens = count_input_tokens(payload)
            if attempt.status == 200 and attempt.complete:
                attempt.output_tokens = min(payload.get("max_tokens", MAX_TOKENS), OUTPUT_TOKENS)


@dataclass
class Metrics:
    """What one run (or the median of several) measured; see the module docstring."""

    planned: int
    asked: int
    completed: int
    failed: int
    failure_rate: float
    broken: int
    agents_dead: int
    attempts: int
    upstream_429s: int
    overloaded: int
    bad_gateway: int
    resets: int
    tokens_charged: int
    wasted_tokens: int
    wasted_floor: int
    wasted_avoidable: int
    wasted_avoidable_share: float
    makespan: float
    makespan_bound: float
    makespan_ratio: float
    goodput: float
    goodput_net: float
    p99_wait: float
    mean_wait: float
    fair_share_max: float
    jain: float


TARGETS: dict[str, tuple[str, Callable[[Metrics], bool]]] = {
    "failures": ("zero client-visible failures", lambda m: m.failed == 0),
    "goodput": ("net goodput >= 95% of the limit", lambda m: m.goodput_net >= 0.95),
    "waste": ("avoidable wasted tokens <= 1%", lambda m: m.wasted_avoidable_share <= 0.01),
    "makespan": ("makespan <= 1.05 x its lower bound", lambda m: m.makespan_ratio <= 1.05),
    "fairness": ("no agent waits > 2 x the mean", lambda m: m.fair_share_max <= FAIR_SHARE),
}


def misses(metrics: Metrics) -> list[str]:
    """The targets ``metrics`` misses (by key)."""
    return [key for key, (_, met) in TARGETS.items() if not met(metrics)]


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index, 1 when all equal (and for all zero)."""
    total, squares = sum(values), sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


def measure(scenario: Scenario, calls: Sequence[CallRecord], log: Sequence[Attempt], start: float) -> Metrics:
    """The metrics of one run from its calls (client side) and its attempts (upstream side)."""
    ok = {c.ident for c in calls if c.ok}
    answered: dict[str, Attempt] = {}
    floor = avoidable = charged = resets = 0
    for attempt in log:
        if attempt.status is None:  # admitted, then reset: charged for its prompt
            resets += 1
            floor += attempt.input_tokens
            charged += attempt.input_tokens
        elif attempt.status == 200:
            tokens = attempt.input_tokens + (attempt.output_tokens if attempt.complete else MAX_TOKENS)
            charged += tokens
            if attempt.complete and attempt.call in ok and attempt.call not in answered:
                answered[attempt.call] = attempt
            else:  # cut short, or its call failed anyway, or answered twice
                avoidable += tokens
    waits: dict[int, float] = dict.fromkeys(range(scenario.agents), 0.0)
    per_call: list[float] = []
    for call in calls:
        if call.ident in answered:
            wait = max(0.0, answered[call.ident].arrived - call.asked)
            per_call.append(wait)
            waits[call.agent] += wait
    completed = len(answered)
    failed = sum(1 for c in calls if not c.ok)
    makespan = max((c.done for c in calls if c.done is not None), default=start) - start
    bound = max(0, completed + resets - scenario.rpm) * 60 / scenario.rpm + scenario.latency
    allowed = scenario.rpm * (1 + makespan / 60)
    mean = statistics.fmean(waits.values())
    statuses = [a.status for a in log]
    return Metrics(
        planned=scenario.planned,
        asked=len(calls),
        completed=completed,
        failed=failed,
        failure_rate=failed / len(calls) if calls else 0.0,
        broken=sum(1 for c in calls if c.broken),
        agents_dead=len({c.agent for c in calls if not c.ok}),
        attempts=len(log),
        upstream_429s=statuses.count(429),
        overloaded=statuses.count(503) + statuses.count(529),
        bad_gateway=statuses.count(502),
        resets=resets,
        tokens_charged=charged,
        wasted_tokens=floor + avoidable,
        wasted_floor=floor,
        wasted_avoidable=avoidable,
        wasted_avoidable_share=avoidable / charged if charged else 0.0,
        makespan=makespan,
        makespan_bound=bound,
        makespan_ratio=makespan / bound,
        goodput=completed / allowed,
        goodput_net=completed / max(1.0, allowed - resets),
        p99_wait=percentile(per_call, 0.99),
        mean_wait=statistics.fmean(per_call) if per_call else 0.0,
        fair_share_max=max(waits.values()) / mean if mean > 0 else 1.0,
        jain=jain_index(list(waits.values())),
    )


def median_metrics(runs: Sequence[Metrics]) -> Metrics:
    """Each metric's median over runs (so a median row need not be one run's row)."""
    columns = {name: [getattr(m, name) for m in runs] for name in Metrics.__dataclass_fields__}
    values = {name: statistics.median(column) for name, column in columns.items()}
    integral = {name for name, column in columns.items() if all(isinstance(v, int) for v in column)}
    return Metrics(**{n: round(v) if n in integral else v for n, v in values.items()})


@dataclass
class ScenarioResult:
    """One run: its settings, its metrics and (t, outstanding, upstream in flight, done, 429s, fill)."""

    scenario: str
    mode: str
    seed: int
    speed: float
    disabled: list[str]
    metrics: Metrics
    real_seconds: float
    samples: list[tuple[float, ...]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.mode + "".join(f" -{d}" for d in self.disabled)


# --- running ------------------------------------------------------------------------------

#: Upstream URL -> an async context manager that serves a proxy in front of it and yields its base URL.
ProxyFactory = Callable[[str], AbstractAsyncContextManager[str]]
#: ``on_records(calls, attempts, start)``: a run's client-side calls and upstream attempts.
RecordsHook = Callable[[Sequence[CallRecord], Sequence[Attempt], float], None]


def _payload(agent: int, step: int, stream: bool) -> dict[str, Any]:
    question = f"agent {agent}, step {step}: summarise the findings so far. " * 4
    body: dict[str, Any] = {
        "model": "mock-model",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": question}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


class BrokenReply(Exception):
    """A 200 whose body is not the whole reply: not retried, as an SDK's parse error is not."""


def reply_text(shape: str, stream: bool, body: bytes) -> str | None:
    """The model's text in a reply body (``shape`` openai or anthropic), or None if the body is not
    a complete reply: a stream must run to its last event (``[DONE]``, ``message_stop``)."""
    try:
        if not stream:
            data = json.loads(body)
            if shape == "openai":
                return str(data["choices"][0]["message"]["content"])
            return "".join(block["text"] for block in data["content"])
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        if shape == "openai":
            if not events or events[-1] != "[DONE]":
                return None
            chunks = [json.loads(e) for e in events[:-1]]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        chunks = [json.loads(e) for e in events]
        if not chunks or chunks[-1].get("type") != "message_stop":
            return None
        return "".join(c["delta"]["text"] for c in chunks if c.get("type") == "content_block_delta")
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def _attempt(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], body: Any
) -> httpx.Response:
    """One HTTP attempt, read to its end (a stream too); :class:`BrokenReply` for a 200 not whole."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        content = await response.aread()
    shape = "anthropic" if path == PATHS["anthropic"] else "openai"
    if response.status_code == 200 and reply_text(shape, bool(body.get("stream")), content) != EXPECTED_TEXT:
        raise BrokenReply(f"{path}: {content[:160]!r}")
    return response


def agent_budget(scenario: Scenario) -> float:
    """Four times the tokens an agent's calls reserve (the gate's estimate: JSON characters / 4 + cap)."""
    messages = _payload(0, 0, False)["messages"]
    return 4.0 * scenario.calls * (len(json.dumps(messages)) / 4 + MAX_TOKENS)


async def run_scenario(
    scenario: Scenario,
    mode: str,
    seed: int,
    speed: float,
    *,
    disable: Iterable[str] = (),
    external_proxy: ProxyFactory | None = None,
    label: str | None = None,
    cutoff: float | None = None,
    on_records: RecordsHook | None = None,
) -> ScenarioResult:
    """Run ``scenario`` once in ``mode`` and measure it.

    ``disable`` names primitives of :data:`ABLATION` to switch off (transport mode).
    ``external_proxy(upstream_url)`` is an async context manager yielding the base URL of
    a proxy it started in front of ``upstream_url`` (``bench/peers.py``'s
    ``functools.partial(hivemind_proxy, rpm=scenario.rpm, max_concurrency=...)``); with
    it, ``mode`` must be ``proxy`` and ``speed`` 1, since a foreign proxy runs on real time. ``label``
    replaces the mode in the result (say ``"hivemind"``): tables judge targets only for
    results labelled ``transport`` or ``proxy``. ``cutoff``: real seconds after which the
    calls still open are cut off and fail (default :meth:`Scenario.deadline` / ``speed``).
    ``on_records(calls, attempts, start)`` sees the run's raw records before they are
    measured (``bench/tail.py`` reads where a run's makespan went from them).
    """
    disabled = sorted(set(disable))
    if mode not in MODES:
        raise ConfigurationError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if unknown := set(disabled) - set(ABLATION):
        raise ConfigurationError(f"cannot disable {sorted(unknown)}: use names from {', '.join(ABLATION)}")
    if disabled and mode != "transport":
        raise ConfigurationError("the ablation runs in transport mode: only there can primitives be disabled")
    if external_proxy is not None and (mode != "proxy" or speed != 1 or disabled):
        raise ConfigurationError("an external proxy runs in proxy mode, at speed 1, with nothing disabled")
    clock = AcceleratedClock(speed)
    mock = RecordingMock(scenario.mock_config(seed), clock)
    retries = 0 if "retries" in disabled else 8
    gate_off = [d for d in disabled if d in PRIMITIVES]
    calls: list[CallRecord] = []
    samples: list[tuple[float, ...]] = []
    real_start = time.perf_counter()
    async with serve_mock(mock) as upstream, contextlib.AsyncExitStack() as stack:
        gate: Gate | None = None
        base = upstream
        if mode == "transport":
            gate = Gate(
                clock=clock,
                max_in_flight=scenario.max_concurrency,
                budgets=TokenBudgets(per_agent=agent_budget(scenario)),
                disable=gate_off,
            )
        elif mode == "proxy" and external_proxy is not None:
            base = await stack.enter_async_context(external_proxy(upstream))
        elif mode == "proxy":
            config = ProxyConfig(
                upstream,
                max_in_flight=scenario.max_concurrency,
                agent_budget=agent_budget(scenario),
                log_level="warning",
            )
            app = ProxyApp(config, clock=clock)
            gate = app.gate
            base = await stack.enter_async_context(serve_asgi(app))

        def client(agent: int) -> httpx.AsyncClient:
            headers = {"authorization": "Bearer sk-bench", "anthropic-version": "2023-06-01"}
            if mode == "transport":
                assert gate is not None
                transport = StigmergyTransport(
                    httpx.AsyncHTTPTransport(), gate=gate, agent_id=f"agent-{agent}", max_retries=retries
                )
                return httpx.AsyncClient(transport=transport, base_url=base, timeout=None, headers=headers)
            if mode == "proxy":  # each proxy's agent header: ours, hivemind's
                headers["x-stigmergy-agent"] = headers["x-hivemind-agent-id"] = f"agent-{agent}"
            return httpx.AsyncClient(base_url=base, timeout=None, headers=headers)

        clients = [await stack.enter_async_context(client(n)) for n in range(scenario.agents)]
        sdk_retries = DEFAULT_RETRIES if mode == "sdk-retries" else 0
        start = clock()  # after the clients exist: building their TLS contexts takes real time

        async def agent(n: int) -> None:
            rng = random.Random(f"{seed}/{n}")
            http = clients[n]
            for step in range(scenario.calls):
                stream = rng.random() < scenario.stream_share
                path = PATHS[rng.choice(("openai", "anthropic"))]
                record = CallRecord(n, step, clock())
                calls.append(record)
                headers = {CALL_HEADER: record.ident}
                body = _payload(n, step, stream)
                try:
                    record.ok = await sdk_call(
                        functools.partial(_attempt, http, path, headers, body),
                        clock.sleep,
                        rng,
                        sdk_retries,
                    )
                except AdmissionError:  # the gate refused (a budget, a quota): a failure too
                    record.ok = False
                except BrokenReply:
                    record.ok, record.broken = False, True
                record.done = clock()
                if not record.ok:
                    return

        async def sample() -> None:
            while True:
                fill = 0.0
                if gate is not None:
                    for route in gate.channels():
                        fill = max(fill, (await gate.read(route)).fill.get("rpm", 0.0))
                outstanding = sum(1 for c in calls if c.done is None)
                done = sum(1 for c in calls if c.ok)
                stats = mock.stats
                row = (clock() - start, outstanding, stats.in_flight, done, stats.rate_limited, fill)
                samples.append(tuple(round(v, 3) for v in row))
                await clock.sleep(SAMPLE_EVERY)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            with anyio.move_on_after(scenario.deadline() / speed if cutoff is None else cutoff):
                async with anyio.create_task_group() as agents:
                    for n in range(scenario.agents):
                        agents.start_soon(agent, n)
            tg.cancel_scope.cancel()
        cut = clock()
        for record in calls:
            if record.done is None:  # cut off at the deadline: a failure
                record.done = cut
    if on_records is not None:
        on_records(calls, mock.log, start)
    metrics = measure(scenario, calls, mock.log, start)
    return ScenarioResult(
        scenario.key, label or mode, seed, speed, disabled, metrics, time.perf_counter() - real_start, samples
    )


# --- reporting ----------------------------------------------------------------------------


def _group(results: Iterable[ScenarioResult]) -> dict[tuple[str, str], list[ScenarioResult]]:
    groups: dict[tuple[str, str], list[ScenarioResult]] = {}
    for result in results:
        groups.setdefault((result.scenario, result.label), []).append(result)
    return groups


def _verdict(metrics: Metrics) -> str:
    missed = misses(metrics)
    return "PASS" if not missed else "MISS " + ", ".join(missed)


def results_table(results: Sequence[ScenarioResult], titles: dict[str, str]) -> str:
    """Markdown: per scenario and mode, the medians over repeats, and the targets' verdict."""
    lines = [
        "| scenario | mode | failed (rate) | dead | 429s | wasted: avoidable / floor | makespan / bound "
        "| goodput (net) | p99 wait | fairness: max/mean, Jain | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (key, label), runs in _group(results).items():
        m = median_metrics([r.metrics for r in runs])
        verdict = _verdict(m) if runs[0].mode in STIGMERGY_MODES else ""
        broken = f"; {m.broken} broken 200s" if m.broken else ""
        lines.append(
            f"| {titles.get(key, key)} | {label} | {m.failed} ({m.failure_rate:.0%}{broken}) "
            f"| {m.agents_dead} "
            f"| {m.upstream_429s} | {m.wasted_avoidable_share:.1%} / "
            f"{m.wasted_floor / max(1, m.tokens_charged):.1%} "
            f"| {m.makespan:.0f} s / {m.makespan_bound:.0f} s = x{m.makespan_ratio:.2f} "
            f"| {m.goodput:.0%} ({m.goodput_net:.0%}) | {m.p99_wait:.0f} s "
            f"| {m.fair_share_max:.2f}, {m.jain:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def ablation_table(results: Sequence[ScenarioResult], titles: dict[str, str]) -> str:
    """Markdown: per primitive switched off, what changes over every scenario (medians per scenario)."""
    by_label: dict[str, list[Metrics]] = {}
    for (_, label), runs in _group(results).items():
        by_label.setdefault(label, []).append(median_metrics([r.metrics for r in runs]))
    scenarios = len({r.scenario for r in results})
    lines = [
        f"| switched off | failed calls | agents dead | 429s | overloaded | worst makespan / bound "
        f"| lowest net goodput | worst max/mean wait | scenarios meeting every target (of {scenarios}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in by_label.items():
        off = label.removeprefix("transport").strip().replace(" -", ", ").lstrip("-") or "nothing"
        lines.append(
            f"| {off} | {sum(m.failed for m in rows)} | {sum(m.agents_dead for m in rows)} "
            f"| {sum(m.upstream_429s for m in rows)} | {sum(m.overloaded for m in rows)} "
            f"| x{max(m.makespan_ratio for m in rows):.2f} | {min(m.goodput_net for m in rows):.0%} "
            f"| {max(m.fair_share_max for m in rows):.2f} | {sum(not misses(m) for m in rows)} |"
        )
    return "\n".join(lines)


def targets_legend() -> str:
    return "; ".join(f"{key}: {text}" for key, (text, _) in TARGETS.items())


def write_json(
    path: Path,
    settings: dict[str, Any],
    groups: dict[str, list[ScenarioResult]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Every run (metrics, misses, samples) and the medians, per table; then ``extra``'s sections as given."""
    out: dict[str, Any] = {"settings": settings, "targets": {k: t for k, (t, _) in TARGETS.items()}}
    for name, results in groups.items():
        medians = []
        for (key, label), runs in _group(results).items():
            m = median_metrics([r.metrics for r in runs])
            medians.append({"scenario": key, "mode": label, "metrics": asdict(m), "misses": misses(m)})
        out[name] = {
            "medians": medians,
            "runs": [asdict(r) | {"misses": misses(r.metrics)} for r in results],
        }
    out |= extra or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def plot(results: Sequence[ScenarioResult], titles: dict[str, str], directory: Path) -> list[Path]:
    """Per scenario: window fill, upstream in flight and completions over time for each mode's first run;
    and one bar chart of medians: share completed, failure rate, makespan ratio, net goodput (matplotlib).

    The share completed comes first: a baseline's makespan and goodput cover only its run until its
    agents died."""
    try:
        importlib.import_module("matplotlib").use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise ConfigurationError(
            f"--plot needs matplotlib: pip install 'stigmergy-field[bench]' ({exc})"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    groups = _group(results)
    for key in dict.fromkeys(r.scenario for r in results):
        figure, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        for (scenario, label), runs in groups.items():
            if scenario != key:
                continue
            times = [s[0] for s in runs[0].samples]
            for axis, column in zip(axes, (5, 2, 3), strict=True):
                axis.plot(times, [s[column] for s in runs[0].samples], label=label)
        for axis, title in zip(
            axes,
            ("gate's rpm window fill (pressure)", "calls in flight upstream", "calls completed"),
            strict=True,
        ):
            axis.set_title(title)
            axis.legend(fontsize="small")
        axes[0].figure.suptitle(titles.get(key, key))
        axes[2].set_xlabel("API seconds")
        figure.tight_layout()
        path = directory / f"scenario-{key}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    labels = list(dict.fromkeys(label for _, label in groups))
    keys = list(dict.fromkeys(r.scenario for r in results))
    figure, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        medians = [
            median_metrics([r.metrics for r in groups[(k, label)]]) if (k, label) in groups else None
            for k in keys
        ]
        for axis, name in zip(
            axes, ("completed", "failure_rate", "makespan_ratio", "goodput_net"), strict=True
        ):
            values = [
                getattr(m, name) / (m.planned if name == "completed" else 1) if m else 0.0 for m in medians
            ]
            axis.bar([x + i * width for x in range(len(keys))], values, width, label=label)
    panel_titles = (
        "calls completed, share of planned",
        "failure rate",
        "makespan / lower bound",
        "net goodput",
    )
    for axis, title in zip(axes, panel_titles, strict=True):
        axis.set_title(title)
    axes[0].legend(fontsize="small")
    axes[2].set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, rotation=20)
    figure.tight_layout()
    path = directory / "metrics.png"
    figure.savefig(path)
    plt.close(figure)
    written.append(path)
    return written


def readme_section(command: str, settings: dict[str, Any], tables: dict[str, str]) -> str:
    """What ``--readme`` puts between the markers: the command, the settings, the tables."""
    parts = [
        BEGIN,
        "```bash",
        command,
        "```",
        "",
        f"Speed {settings['speed']:g}x, seeds {settings['seeds']}, medians over {len(settings['seeds'])} "
        f"run(s) each; {settings['real_seconds']:.0f} s of real time on this machine. Targets "
        f"({targets_legend()}) are judged for the stigmergy modes; baselines are reported as they are.",
    ]
    for title, table in tables.items():
        parts += ["", f"**{title}**", "", table]
    parts.append(END)
    return "\n".join(parts)


def update_readme(section: str, path: Path = README) -> None:
    """Replace what the README holds between the results markers."""
    text = path.read_text()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ConfigurationError(f"{path} has no {BEGIN} ... {END} section to rewrite")
    path.write_text(head + section + tail)


# --- peers ------------------------------------------------------------------------------------

#: ``--peers`` by default: one clean and one faulty scenario, quick-sized (real time: 1-2 min a run).
PEER_SCENARIOS = ("50rpm-20", "faulty-60rpm")
#: Real seconds a peer run may take; then its open calls are cut off and count as failures.
PEER_TIMEOUT = 240.0
#: hivemind-scheduler's proxy, then ours (``stigmergy proxy`` as a process): both from bench/peers.py.
PEER, OURS = "hivemind", "proxy"
#: The ratio row, peer / ours (above 1 the peer did worse on all but net goodput).
RATIO_METRICS = ("failed", "makespan_ratio", "goodput_net", "p99_wait", "fair_share_max")


def peer_ratios(peer: Metrics, ours: Metrics) -> dict[str, float | None]:
    """Peer / ours for each of :data:`RATIO_METRICS`: 1 when both are 0, None when only ours is 0."""
    ratios: dict[str, float | None] = {}
    for name in RATIO_METRICS:
        theirs, mine = float(getattr(peer, name)), float(getattr(ours, name))
        ratios[name] = theirs / mine if mine else (1.0 if theirs == 0 else None)
    return ratios


def scenario_ratios(results: Sequence[ScenarioResult]) -> dict[str, dict[str, float | None]]:
    """Per scenario, :func:`peer_ratios` of the medians of the peer's runs and of ours."""
    out = {}
    for key in dict.fromkeys(r.scenario for r in results):
        peer, ours = (
            median_metrics([r.metrics for r in results if r.scenario == key and r.label == name])
            for name in (PEER, OURS)
        )
        out[key] = peer_ratios(peer, ours)
    return out


def peers_table(results: Sequence[ScenarioResult], titles: dict[str, str]) -> str:
    """:func:`results_table` of the peer's and our runs, each scenario followed by its ratio row."""
    lines = results_table([], titles).splitlines()
    for key, ratios in scenario_ratios(results).items():
        lines += results_table([r for r in results if r.scenario == key], titles).splitlines()[2:]
        cell = {n: "ours 0" if v is None else f"x{v:.2f}" for n, v in ratios.items()}
        lines.append(
            f"| {titles.get(key, key)} | {PEER} / ours | {cell['failed']} | | | | {cell['makespan_ratio']} "
            f"| {cell['goodput_net']} | {cell['p99_wait']} | {cell['fair_share_max']} | |"
        )
    return "\n".join(lines)


def _peers_module() -> Any:
    """bench/peers.py, imported as the bench scripts import each other (bench/ on ``sys.path``)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("peers")


async def run_peers(
    scenarios: Sequence[Scenario], seed: int, cutoff: float = PEER_TIMEOUT
) -> list[ScenarioResult]:
    """Each scenario through hivemind's proxy, then through ours, at speed 1 (hivemind keeps real time).

    Both proxies run as processes of their own, told the scenario's limits (``rpm``, and its
    concurrency cap where it has one; otherwise each keeps its default: hivemind 5, ours none),
    in front of a fresh mock with the same seed; the clients are the proxy mode's (they never
    retry). A run is cut off after ``cutoff`` real seconds (its open calls fail).
    """
    peers = _peers_module()
    python = await anyio.to_thread.run_sync(peers.peer_venv, *peers.HIVEMIND)  # minutes the first time
    results = []
    for scenario in scenarios:
        limits = {"rpm": scenario.rpm, "max_concurrency": scenario.max_concurrency}
        proxies: dict[str, ProxyFactory] = {
            PEER: functools.partial(peers.hivemind_proxy, python=python, **limits),
            OURS: functools.partial(peers.stigmergy_proxy, **limits),
        }
        for label, proxy in proxies.items():
            result = await run_scenario(
                scenario,
                "proxy",
                seed,
                1.0,
                external_proxy=proxy,
                label=label,
                cutoff=min(cutoff, scenario.deadline()),
            )
            _progress(result)
            results.append(result)
    return results


def peer_scenarios(value: str) -> list[str]:
    """``--peer-scenarios``: comma-separated keys of :data:`SCENARIOS`."""
    keys = [k.strip() for k in value.split(",") if k.strip()]
    known = [s.key for s in SCENARIOS]
    if not keys or set(keys) - set(known):
        raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated keys of {', '.join(known)}")
    return keys


def scheduler_table(rows: Sequence[dict[str, str]]) -> str:
    """Markdown: bench/scheduler.py --peer's rows (stigmergy-scheduler against ours)."""
    lines = ["| workload | metric | ours | peer | peer / ours |", "|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['metric']} | {r['ours']} | {r['peer']} | {r['ratio']} |" for r in rows]
    return "\n".join(lines)


def main_peers(args: argparse.Namespace, started: float) -> int:
    """``--peers``: the proxy scenarios against hivemind-scheduler, the scheduler workloads against
    stigmergy-scheduler; tables printed, everything in the JSON."""
    peers = _peers_module()
    scenarios = [s.quick() for s in SCENARIOS if s.key in args.peer_scenarios]
    titles = {s.key: s.title for s in scenarios}
    hivemind, scheduler = (" ".join(p) for p in (peers.HIVEMIND, peers.STIGMERGY_SCHEDULER))
    print(f"peers: {len(scenarios)} quick scenarios x ({hivemind}, ours) in real time, seed {args.seed}")
    runs = anyio.run(run_peers, scenarios, args.seed, args.peer_timeout)
    print(f"peers: {scheduler} on the scheduler workloads{' (quick)' if args.quick else ''}")
    rows = peers.scheduler_peer_rows(quick=args.quick)
    tables = {
        f"Proxy scenarios, {hivemind} against ours, real time (quick sizes, seed {args.seed})": peers_table(
            runs, titles
        ),
        f"Scheduler workloads, {scheduler} against ours": scheduler_table(rows),
    }
    for title, table in tables.items():
        print(f"\n{title}\n{table}")
    settings = {
        "speed": 1.0,
        "seeds": [args.seed],
        "quick": True,
        "peer_timeout": args.peer_timeout,
        "scheduler_quick": args.quick,
        "real_seconds": time.perf_counter() - started,
        "scenarios": [asdict(s) for s in scenarios],
        "peers": {"proxy": hivemind, "scheduler": scheduler},
    }
    extra = {"peer_over_ours": scenario_ratios(runs), "scheduler_peers": rows}
    write_json(args.json, settings, {"peers": runs}, extra)
    print(f"JSON written to {args.json}")
    return 0


# --- command line ----------------------------------------------------------------------------


async def run_all(
    scenarios: Sequence[Scenario],
    variants: Sequence[tuple[str, tuple[str, ...]]],
    seeds: Sequence[int],
    speed: float,
) -> list[ScenarioResult]:
    """Every scenario x variant (mode, switched off) x seed, one after another, printing a line each."""
    results = []
    for scenario in scenarios:
        for mode, disabled in variants:
            for seed in seeds:
                result = await run_scenario(scenario, mode, seed, speed, disable=disabled)
                _progress(result)
                results.append(result)
    return results


def _progress(result: ScenarioResult) -> None:
    """One line per finished run, so a long bench shows it is moving."""
    m = result.metrics
    print(
        f"  {result.scenario:13} {result.label:24} seed {result.seed}: {m.completed}/{m.planned} done, "
        f"{m.failed} failed, {m.upstream_429s} 429s, makespan x{m.makespan_ratio:.2f} "
        f"({result.real_seconds:.1f} s real)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1.5 windows of demand, one seed")
    parser.add_argument("--speed", type=float, default=20.0, help="how much faster time runs (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="seeds per scenario and mode (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    keys = [s.key for s in SCENARIOS]
    parser.add_argument("--scenario", nargs="+", choices=keys, default=keys, help="scenarios (default all)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="modes (default all)")
    parser.add_argument("--ablation", action="store_true", help="also each primitive off (transport, 1 seed)")
    parser.add_argument(
        "--json", type=Path, help="where to write JSON (default bench/results/scenarios.json, peers.json)"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNGs there (needs matplotlib)")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's results section")
    peers = parser.add_argument_group("peers (real time; instead of the runs above)")
    peers.add_argument(
        "--peers",
        action="store_true",
        help="hivemind-scheduler's proxy against ours on quick-sized scenarios, at speed 1; "
        "stigmergy-scheduler against ours on the scheduler workloads (--quick: its quick bench)",
    )
    peers.add_argument(
        "--peer-scenarios",
        type=peer_scenarios,
        default=list(PEER_SCENARIOS),
        metavar="KEY,...",
        help=f"scenarios for --peers (default {','.join(PEER_SCENARIOS)})",
    )
    peers.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT,
        metavar="S",
        help=f"real seconds before a peer run's open calls are cut off (default {PEER_TIMEOUT:g})",
    )
    args = parser.parse_args(args_list)
    if args.repeats < 1 or not args.speed > 0 or not args.peer_timeout > 0:
        parser.error("--repeats must be >= 1, --speed and --peer-timeout > 0")
    if args.peers and (args.ablation or args.plot or args.readme):
        parser.error("--peers runs on its own: its tables go into the README by hand, not --readme")
    args.json = args.json or RESULTS / ("peers.json" if args.peers else "scenarios.json")
    if args.peers:
        return main_peers(args, time.perf_counter())
    scenarios = [s for s in SCENARIOS if s.key in args.scenario]
    if args.quick:
        scenarios = [s.quick() for s in scenarios]
    seeds = list(range(args.seed, args.seed + (1 if args.quick else args.repeats)))
    titles = {s.key: s.title for s in scenarios}
    started = time.perf_counter()
    print(f"{len(scenarios)} scenarios x {len(args.mode)} modes x {len(seeds)} seeds at {args.speed:g}x")
    main_runs = anyio.run(run_all, scenarios, [(m, ()) for m in args.mode], seeds, args.speed)
    tables = {"Scenarios (medians)": results_table(main_runs, titles)}
    groups = {"scenarios": main_runs}
    if args.ablation:
        variants = [("transport", ()), *(("transport", (p,)) for p in ABLATION)]
        print(f"ablation: {len(scenarios)} scenarios x {len(variants)} variants, seed {seeds[0]}")
        groups["ablation"] = anyio.run(run_all, scenarios, variants, seeds[:1], args.speed)
        title = f"Ablation, transport mode, seed {seeds[0]}: one primitive off at a time (over all scenarios)"
        tables[title] = ablation_table(groups["ablation"], titles)
    settings = {
        "speed": args.speed,
        "seeds": seeds,
        "quick": args.quick,
        "real_seconds": time.perf_counter() - started,
        "scenarios": [asdict(s) for s in scenarios],
    }
    for title, table in tables.items():
        print(f"\n{title}\n{table}")
    print(f"\ntargets: {targets_legend()}")
    write_json(args.json, settings, groups)
    print(f"JSON written to {args.json}")
    if args.plot:
        for path in plot(main_runs, titles, args.plot):
            print(f"plot written to {path}")
    if args.readme:
        command = "python bench/scenarios.py " + " ".join(a for a in args_list if a != "--readme")
        update_readme(readme_section(command.strip(), settings, tables))
        print(f"results section of {README} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
