"""bench/scenarios.py: metrics from known events, tiny real runs of every mode, the README rewrite.

Nothing here asserts on wall-clock time: the runs are tiny, on an accelerated clock, and
checked for what happened (calls, attempts, failures), not for how long it took.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from stigmergy.errors import ConfigurationError
from stigmergy.integrations.proxy_server import serve_asgi


def load_bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "scenarios.py"
    spec = importlib.util.spec_from_file_location("bench_scenarios", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_metrics_from_known_events() -> None:
    """Two agents of two calls at 2 RPM; agent 1's second call fails after a reset."""
    scenario = bench.Scenario("t", "tiny", agents=2, calls=2, rpm=2, ttft=1.0)
    calls = [
        bench.CallRecord(0, 0, asked=0.0, done=1.0, ok=True),
        bench.CallRecord(1, 0, asked=0.0, done=1.0, ok=True),
        bench.CallRecord(0, 1, asked=1.0, done=32.0, ok=True),
        bench.CallRecord(1, 1, asked=1.0, done=40.0, ok=False),
    ]
    log = [
        bench.Attempt("0/0", 0.0, 200, True, input_tokens=10, output_tokens=8),
        bench.Attempt("1/0", 0.0, 200, True, input_tokens=10, output_tokens=8),
        bench.Attempt("0/1", 1.0, 429),  # bounced: not charged
        bench.Attempt("0/1", 31.0, 200, True, input_tokens=10, output_tokens=8),
        bench.Attempt("1/1", 39.0, None, input_tokens=10),  # reset: charged, the floor
        bench.Attempt("1/1", 39.5, 200, False, input_tokens=10),  # cut short: avoidable
    ]
    m = bench.measure(scenario, calls, log, start=0.0)
    assert (m.asked, m.completed, m.failed, m.agents_dead) == (4, 3, 1, 1)
    assert m.failure_rate == pytest.approx(0.25)
    assert (m.attempts, m.upstream_429s, m.resets) == (6, 1, 1)
    assert m.wasted_floor == 10 and m.wasted_avoidable == 10 + bench.MAX_TOKENS
    assert m.tokens_charged == 3 * 18 + 10 + 10 + bench.MAX_TOKENS
    assert m.wasted_avoidable_share == pytest.approx(m.wasted_avoidable / m.tokens_charged)
    assert m.makespan == 40.0
    assert m.makespan_bound == pytest.approx((3 + 1 - 2) * 30 + 1.0)  # 2 past the burst, 30 s each
    allowed = 2 * (1 + 40 / 60)
    assert m.goodput == pytest.approx(3 / allowed) and m.goodput_net == pytest.approx(3 / (allowed - 1))
    assert m.mean_wait == pytest.approx(30 / 3) and m.p99_wait == 30.0  # waits 0, 0 and 30
    assert m.fair_share_max == pytest.approx(30 / 15)  # agent 0 waited 30, agent 1 0: mean 15
    assert m.jain == pytest.approx(0.5)
    assert bench.misses(m) == ["failures", "waste"]  # and 2.0 x the mean wait is still allowed


def test_medians_and_helpers() -> None:
    assert bench.percentile([], 0.99) == 0.0
    assert bench.percentile(list(range(1, 101)), 0.99) == 99
    assert bench.jain_index([3.0, 3.0, 3.0]) == 1.0 and bench.jain_index([0.0, 0.0]) == 1.0
    scenario = bench.Scenario("t", "tiny", agents=1, calls=1, rpm=60)
    runs = [
        bench.measure(
            scenario, [bench.CallRecord(0, 0, 0.0, d, True)], [bench.Attempt("0/0", 0.0, 200, True)], 0.0
        )
        for d in (1.0, 2.0, 9.0)
    ]
    median = bench.median_metrics(runs)
    assert median.makespan == 2.0 and median.completed == 1 and isinstance(median.completed, int)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn needs asyncio


TINY = bench.Scenario("tiny", "3 agents, 4 RPM, 30% resets", agents=3, calls=2, rpm=4, p_reset=0.3, ttft=0.5)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", bench.MODES)
async def test_a_tiny_run_of_each_mode_accounts_for_every_call(mode: str) -> None:
    result = await bench.run_scenario(TINY, mode, seed=3, speed=60.0)
    m = result.metrics
    assert m.asked == m.completed + m.failed and m.completed <= TINY.planned
    assert m.attempts >= m.asked and result.samples
    if mode in bench.STIGMERGY_MODES:
        assert m.failed == 0 and m.completed == TINY.planned and m.wasted_avoidable == 0


@pytest.mark.anyio
async def test_retries_off_in_the_ablation_lets_resets_through() -> None:
    """Half the calls reset; without the transport's retries their agents see it and die."""
    resetting = bench.Scenario("resets", "resets", agents=3, calls=2, rpm=60, p_reset=0.5, ttft=0.5)
    result = await bench.run_scenario(resetting, "transport", seed=3, speed=60.0, disable=["retries"])
    assert result.label == "transport -retries"
    assert result.metrics.resets > 0 and result.metrics.failed > 0


@pytest.mark.anyio
async def test_an_external_proxy_is_entered_in_real_time() -> None:
    entered: list[str] = []

    @contextlib.asynccontextmanager
    async def passthrough(upstream: str) -> AsyncIterator[str]:
        entered.append(upstream)
        yield upstream  # no proxy at all: the clients reach the mock directly

    quick = bench.Scenario("rt", "real time", agents=2, calls=2, rpm=1000, ttft=0.01)
    result = await bench.run_scenario(
        quick, "proxy", seed=1, speed=1.0, external_proxy=passthrough, label="passthrough"
    )
    assert entered and entered[0].startswith("http://127.0.0.1:")
    assert result.metrics.completed == 4 and result.label == "passthrough"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("fast", {}),
        ("proxy", {"disable": ["aging"]}),
        ("transport", {"disable": ["nonsense"]}),
        ("transport", {"external_proxy": contextlib.nullcontext}),
        ("proxy", {"external_proxy": contextlib.nullcontext}),  # at speed 60: refused
    ],
)
async def test_bad_settings_are_refused(mode: str, settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        await bench.run_scenario(TINY, mode, seed=1, speed=60.0, **settings)


def test_the_readme_section_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\nrest\n")
    settings = {"speed": 20.0, "seeds": [1, 2], "real_seconds": 3.0}
    section = bench.readme_section("python bench/scenarios.py --quick", settings, {"T": "| a |"})
    bench.update_readme(section, readme)
    text = readme.read_text()
    assert text.startswith("intro\n" + bench.BEGIN) and text.endswith(bench.END + "\nrest\n")
    assert "old" not in text and "python bench/scenarios.py --quick" in text and "| a |" in text
    readme.write_text("no markers")
    with pytest.raises(ConfigurationError, match="results:begin"):
        bench.update_readme(section, readme)


def test_plots_and_tables_from_results(tmp_path: Path) -> None:
    scenario = bench.Scenario("t", "tiny", agents=1, calls=1, rpm=1)  # one call in 1 s: all the limit allowed
    calls = [bench.CallRecord(0, 0, 0.0, 1.0, True)]
    metrics = bench.measure(scenario, calls, [bench.Attempt("0/0", 0.0, 200, True)], 0.0)
    samples = [(0.0, 1, 1, 0, 0, 0.0), (1.0, 0, 0, 1, 0, 0.02)]
    results = [
        bench.ScenarioResult("t", mode, 1, 20.0, [], metrics, 0.1, samples)
        for mode in ("sdk-retries", "proxy")
    ]
    paths = bench.plot(results, {"t": "tiny"}, tmp_path)
    assert [p.name for p in paths] == ["scenario-t.png", "metrics.png"] and all(
        p.stat().st_size for p in paths
    )
    table = bench.results_table(results, {"t": "tiny"}).splitlines()
    assert table[2].endswith("|  |") and table[3].endswith("| PASS |")  # targets judged for stigmergy only


# --- peers: the plumbing, without venvs, hivemind or minutes of real time -----------------------


def _result(label: str, metrics: object) -> object:
    return bench.ScenarioResult("t", label, 1, 1.0, [], metrics, 0.1)  # run_scenario: mode = label


def test_the_ratio_row_divides_the_peers_medians_by_ours() -> None:
    scenario = bench.Scenario("t", "tiny", agents=2, calls=2, rpm=2, ttft=1.0)
    ours = bench.measure(
        scenario, [bench.CallRecord(0, 0, 0.0, 1.0, True)], [bench.Attempt("0/0", 0.0, 200, True)], 0.0
    )
    ours = dataclasses.replace(
        ours, failed=0, makespan_ratio=1.02, goodput_net=0.98, p99_wait=10.0, fair_share_max=1.1
    )
    peer = dataclasses.replace(
        ours, failed=3, makespan_ratio=2.04, goodput_net=0.49, p99_wait=25.0, fair_share_max=1.1
    )
    assert bench.peer_ratios(peer, ours) == {
        "failed": None,  # ours 0, the peer's not: no ratio
        "makespan_ratio": pytest.approx(2.0),
        "goodput_net": pytest.approx(0.5),
        "p99_wait": pytest.approx(2.5),
        "fair_share_max": pytest.approx(1.0),
    }
    assert bench.peer_ratios(ours, ours)["failed"] == 1.0  # both 0
    results = [_result(bench.PEER, peer), _result(bench.OURS, ours)]
    assert bench.scenario_ratios(results) == {"t": bench.peer_ratios(peer, ours)}
    lines = bench.peers_table(results, {"t": "tiny"}).splitlines()
    assert (
        len(lines) == 5
        and lines[2].startswith("| tiny | hivemind |")
        and lines[3].startswith("| tiny | proxy |")
    )
    assert lines[2].endswith("|  |")  # the peer is reported, not judged against our targets
    assert lines[4] == "| tiny | hivemind / ours | ours 0 | | | | x2.00 | x0.50 | x2.50 | x1.00 | |"


async def _broken_replies(scope: Any, receive: Any, send: Any) -> None:
    """A proxy that has sent its 200 before the upstream failed: the error inside the body."""
    if scope["type"] != "http":
        return
    request = json.loads(await _read_body(receive))
    stream = bool(request.get("stream"))
    body = b'data: {"error": "upstream 502"}\n\n' if stream else b'{"error": "upstream 502"}'
    kind = b"text/event-stream" if stream else b"application/json"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@pytest.mark.anyio
async def test_a_200_whose_body_is_not_the_whole_reply_is_a_client_visible_failure() -> None:
    @contextlib.asynccontextmanager
    async def broken(upstream: str) -> AsyncIterator[str]:
        async with serve_asgi(_broken_replies) as url:
            yield url

    quick = bench.Scenario("rt", "real time", agents=3, calls=2, rpm=1000, ttft=0.01, stream_share=0.5)
    result = await bench.run_scenario(quick, "proxy", seed=1, speed=1.0, external_proxy=broken, label="b")
    m = result.metrics
    assert (m.asked, m.failed, m.broken, m.agents_dead, m.completed) == (3, 3, 3, 3, 0)
    assert "3 (100%; 3 broken 200s)" in bench.results_table([result], {})


@pytest.mark.parametrize("body", [b"", b'{"choices": []}', b'data: {"error": "x"}\n\n'])
@pytest.mark.parametrize("stream", [False, True])
def test_reply_text_rejects_what_is_not_a_whole_reply(body: bytes, stream: bool) -> None:
    assert (
        bench.reply_text("openai", stream, body) is None
        and bench.reply_text("anthropic", stream, body) is None
    )


def test_peers_arguments_are_parsed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.peer_scenarios("50rpm-20, faulty-60rpm") == ["50rpm-20", "faulty-60rpm"]
    for bad in ("", "50rpm-20,nope"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.peer_scenarios(bad)
    for argv in (["--peers", "--readme"], ["--peers", "--ablation"], ["--peers", "--peer-scenarios", "x"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    assert "--peers" in capsys.readouterr().err


def test_peers_runs_both_proxies_with_the_scenarios_limits_and_writes_the_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/peers.py replaced by passthrough 'proxies': the runs, the tables and the JSON."""
    told: list[tuple[str, dict[str, Any]]] = []

    def proxy(name: str) -> Any:
        @contextlib.asynccontextmanager
        async def serve(upstream: str, **settings: Any) -> AsyncIterator[str]:
            told.append((name, settings))
            yield upstream

        return serve

    rows = [{"workload": "chain", "metric": "cost/task", "ours": "1 µs", "peer": "2 µs", "ratio": "2.00x"}]
    fake = types.SimpleNamespace(
        HIVEMIND=("hivemind-scheduler", "0.2.0"),
        STIGMERGY_SCHEDULER=("stigmergy-scheduler", "0.2.0"),
        peer_venv=lambda package, version: Path("/venv/bin/python"),
        hivemind_proxy=proxy("hivemind"),
        stigmergy_proxy=proxy("ours"),
        scheduler_peer_rows=lambda quick: rows if quick else [],
    )
    # quick-sized (--peers runs Scenario.quick()): 2 calls each, the second of both answered 429
    tiny = bench.Scenario("tiny", "2 agents", agents=2, calls=9, rpm=2, ttft=0.01, max_concurrency=3)
    monkeypatch.setattr(bench, "_peers_module", lambda: fake)
    monkeypatch.setattr(bench, "SCENARIOS", (tiny,))
    out = tmp_path / "peers.json"
    assert bench.main(["--peers", "--quick", "--peer-scenarios", "tiny", "--json", str(out)]) == 0
    limits = {"rpm": 2, "max_concurrency": 3}
    assert told == [("hivemind", limits | {"python": Path("/venv/bin/python")}), ("ours", limits)]
    printed = capsys.readouterr().out
    assert "| 2 agents | hivemind / ours | x1.00 |" in printed and "| chain | cost/task |" in printed
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["peers"]["runs"]] == ["hivemind", "proxy"]
    assert [m["mode"] for m in data["peers"]["medians"]] == ["hivemind", "proxy"]
    assert [m["metrics"]["planned"] for m in data["peers"]["medians"]] == [4, 4]
    assert data["peer_over_ours"]["tiny"]["failed"] == 1.0 and data["scheduler_peers"] == rows
    assert data["settings"]["speed"] == 1.0 and data["settings"]["scheduler_quick"] is True
