"""The peers: stigmergy-scheduler and hivemind-scheduler, each in its own venv, run beside ours.

    python bench/peers.py --smoke [--json OUT.json]
    python bench/peers.py --scheduler [--full] [--json OUT.json]

Both peers are installed at a pinned version into their own venv under
``~/.cache/stigmergy-bench/`` (:func:`peer_venv`; created once, then reused), never into
ours: stigmergy-scheduler imports as ``stigmergy`` too, and hivemind brings its own
uvicorn and starlette. What each is compared on:

- stigmergy-scheduler, on the scheduler workloads: :func:`scheduler_peer_rows` runs
  ``bench/scheduler.py --peer`` and returns its peer/ours rows.
- hivemind-scheduler, on the proxy scenarios: :func:`hivemind_proxy` runs its proxy
  in front of the mock provider, and :func:`stigmergy_proxy` runs ours the same way
  (a process of its own, so neither shares a CPU or an event loop with the load).

``--smoke`` sends a burst of OpenAI- and Anthropic-shaped requests, streamed and not,
through each proxy to a faulty, rate-limited mock (``MockConfig(rpm=60, p502=0.08,
p_reset=0.05)``, reset before each proxy so both meet the same seeded faults; which
request meets a fault depends on arrival order) and prints what the clients got and what
reached the mock.

What hivemind-scheduler 0.2.0's proxy does (read from its source, seen in the smoke run):

- Routes every path to ``upstream + path``: OpenAI clients use ``base_url + "/v1"``,
  Anthropic clients ``base_url``; it forwards the client's headers, API key included,
  and needs no key of its own. ``GET /_health`` and ``GET /_stats`` are its own.
- Detects the provider from the upstream URL; a 127.0.0.1 upstream is "generic":
  at most 5 requests at once (``--max-concurrency``), shrunk by AIMD (halved on every
  retried error, +0.5 every 5 s while latency is under 2 s), and a 60-RPM / 100k-TPM
  sliding log from that provider profile: past the limit a request waits until the
  oldest in the last minute is a minute old (72 requests at rpm 60: 60 s; ours 13 s).
  No flag sets the RPM or TPM. It also reads ``x-ratelimit-*`` / ``anthropic-ratelimit-*``
  headers and pauses everything when 2 requests or fewer remain (5 s for OpenAI's).
- Non-streamed requests are retried up to 3 times (``--max-retries``) on 429, 500, 502,
  503, 529, and on connection errors whose *message* says reset/refused/timeout, after
  ``max(1 s * 2**attempt +-25%, retry-after)``; a retry-after also pauses every request
  it sends. ``x-should-retry: false`` is ignored. A real connection reset is not retried:
  httpx's ``ReadError`` for it has an empty message, so the client gets 502
  ``{"error": "HiveMind proxy error: "}``. At a 50% error rate over 20 requests a
  circuit breaker answers everything 503 for 10 s; a request that waits 120 s for a slot
  gets 503.
- Streamed requests are never retried, and their status is lost: the reply is always
  200 ``text/event-stream``. An upstream error's body comes inside it (twice), and a
  reset gives an empty or cut stream, without any error.
- In proxy mode it opens no database (``--db`` is parsed, then unused), imports neither
  its tokenizer (tiktoken would download encodings) nor its MCP server, and connects to
  nothing but the upstream (checked with strace: its only ``connect`` calls go to the
  mock). We still give it ``--db`` in a temporary directory, run it there, and drop
  ``*_proxy`` variables from its environment (its httpx client would follow them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from scenarios import reply_text
from scheduler import table

from stigmergy.mock_api import MockConfig, reply_words, serve_mock

BENCH = Path(__file__).resolve().parent
HIVEMIND = ("hivemind-scheduler", "0.2.0")
STIGMERGY_SCHEDULER = ("stigmergy-scheduler", "0.2.0")

INSTALL_TIMEOUT_S = 600.0  # creating a venv and installing one package with its dependencies
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL
SMOKE_TIMEOUT_S = 45.0  # one proxy's burst in the smoke run

#: Runs hivemind's own CLI (``hivemind.__main__.main``) after setting the RPM and TPM of
#: the provider profile it will pick for the upstream: it has no flag for them.
#: argv: RPM TPM (empty: keep the profile's) then hivemind's own arguments.
HIVEMIND_LAUNCHER = """\
import sys
from hivemind.__main__ import main
from hivemind.scheduler.providers import detect_provider
rpm, tpm = sys.argv[1:3]
del sys.argv[1:3]
profile = detect_provider(sys.argv[sys.argv.index("--upstream") + 1])
if rpm:
    profile.default_requests_per_minute = int(rpm)
if tpm:
    profile.default_tokens_per_minute = int(tpm)
main()
"""
HIVEMIND_URL = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
STIGMERGY_URL = re.compile(r"stigmergy proxy: (http://127\.0\.0\.1:\d+)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- venvs -----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stigmergy-bench"


def peer_venv(package: str, version: str, venv: Path | None = None) -> Path:
    """The interpreter of a venv holding exactly ``package==version``, created or repaired if needed.

    Default venv: ``~/.cache/stigmergy-bench/<package>-<version>``. A venv whose package
    already imports at that version is reused without touching the network. Installing is
    bounded by ``INSTALL_TIMEOUT_S`` and fails with pip's own words, e.g. when the package
    registry cannot be reached.
    """
    venv = venv or cache_dir() / f"{package}-{version}"
    python = venv / "bin" / "python"
    if installed_version(python, package) == version:
        return python
    try:
        if not python.exists():
            log(f"creating {venv}")
            venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(venv)],
                check=True,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
        log(f"installing {package}=={version} into {venv}")
        subprocess.run(
            [str(python), "-I", "-m", "pip", "install", "-q", "--timeout", "30", f"{package}=={version}"],
            check=True,
            capture_output=True,
            text=True,
            cwd=venv.parent,
            env=peer_env(keep_proxies=True),
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"installing {package}=={version} into {venv} took over {INSTALL_TIMEOUT_S:g} s;"
            " is the package registry reachable?"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"could not install {package}=={version} into {venv} (is the package registry"
            f" reachable?):\n{(exc.stderr or '').strip()[-2000:]}"
        ) from None
    found = installed_version(python, package)
    if found != version:
        raise RuntimeError(f"{venv} holds {package} {found}, not {version}")
    return python


def installed_version(python: Path, package: str) -> str | None:
    """``package``'s version in the venv of ``python``, or None (no venv, or not installed)."""
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-I", "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        cwd=python.parent,
        timeout=60,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def peer_env(*, keep_proxies: bool = False) -> dict[str, str]:
    """Our environment for a peer's process: no ``PYTHON*`` (it imports only its own venv).

    Unless ``keep_proxies`` (pip may need them), no ``*_proxy`` variables either: a
    server we start talks to 127.0.0.1 only, and its httpx client would follow them.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTHON") and (keep_proxies or not k.lower().endswith("_proxy"))
    }


# -- proxies as processes --------------------------------------------------------------------------


def hivemind_command(
    python: Path,
    upstream_url: str,
    db: Path,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
) -> list[str]:
    """``hivemind proxy`` on a free port of 127.0.0.1, through :data:`HIVEMIND_LAUNCHER`."""
    command = [str(python), "-I", "-c", HIVEMIND_LAUNCHER, str(rpm or ""), str(tpm or "")]
    command += ["--log-level", "INFO", "proxy", "--host", "127.0.0.1", "--port", "0"]
    command += ["--upstream", upstream_url, "--db", str(db)]
    if max_concurrency is not None:
        command += ["--max-concurrency", str(max_concurrency)]
    return command


def stigmergy_command(
    upstream_url: str, *, rpm: int | None = None, tpm: int | None = None, max_concurrency: int | None = None
) -> list[str]:
    """``stigmergy proxy`` (ours, this interpreter's) on a free port of 127.0.0.1."""
    command = [sys.executable, "-m", "stigmergy.cli", "proxy", "--upstream", upstream_url]
    command += ["--port", "0", "--log-level", "warning"]
    for flag, value in (("--rpm", rpm), ("--tpm", tpm), ("--max-in-flight", max_concurrency)):
        if value is not None:
            command += [flag, str(value)]
    return command


def served_url(output: str, pattern: re.Pattern[str]) -> str | None:
    """The base URL a server printed once it listened (its real port, as it was started on port 0)."""
    found = pattern.search(output)
    return found.group(1) if found else None


@contextlib.asynccontextmanager
async def serve_process(
    command: Sequence[str], url_pattern: re.Pattern[str], health_path: str, workdir: Path
) -> AsyncIterator[str]:
    """Start ``command`` in its own process group, in ``workdir``, output to ``workdir/server.log``.

    Yields its base URL once it has printed it and ``health_path`` answers 200 (at most
    ``STARTUP_TIMEOUT_S``); on exit sends the whole group SIGTERM, then SIGKILL after
    ``STOP_TIMEOUT_S``.
    """
    log_path = workdir / "server.log"
    with log_path.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=peer_env(),
            start_new_session=True,
        )
    try:
        yield await _ready(process, log_path, url_pattern, health_path)
    finally:
        await _stop(process)


async def _ready(process: Process, log_path: Path, pattern: re.Pattern[str], health: str) -> str:
    """The server's URL once it answers on ``health``; RuntimeError with its output if it does not."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline and process.returncode is None:
            url = served_url(await asyncio.to_thread(log_path.read_text, errors="replace"), pattern)
            if url is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url + health)).status_code == 200:
                        return url
            await asyncio.sleep(0.05)
    output = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-3000:]
    state = "did not answer" if process.returncode is None else f"exited with {process.returncode}"
    raise RuntimeError(f"server {state} within {STARTUP_TIMEOUT_S:g} s; its output:\n{output}")


async def _stop(process: Process) -> None:
    """SIGTERM to the group we started (the server and any child of it), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the server if it hung, children if they outlived it
    await process.wait()


@contextlib.asynccontextmanager
async def hivemind_proxy(
    upstream_url: str,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
    python: Path | None = None,
) -> AsyncIterator[str]:
    """hivemind-scheduler 0.2.0's proxy in front of ``upstream_url``; yields its base URL.

    OpenAI clients use ``base_url + "/v1"``, Anthropic clients ``base_url``. It runs as its
    own process (``python`` of its venv; default :func:`peer_venv`'s, installed on first
    use) on a free port of 127.0.0.1, in a temporary directory that also holds its
    ``--db``, until the block exits.

    Fair settings: ``rpm`` and ``tpm`` are the scenario's known limits. Hivemind has no flag
    for them (it seeds a 60-RPM / 100k-TPM window from its provider profile), so when given
    they replace that profile's figures before its CLI runs; None keeps them. Its
    concurrency cap stays its default (5) unless ``max_concurrency`` is given; retries,
    back-off and AIMD keep their defaults. Give the same limits to :func:`stigmergy_proxy`.
    """
    if python is None:
        python = await asyncio.to_thread(peer_venv, *HIVEMIND)  # minutes the first time: off the loop
    with tempfile.TemporaryDirectory(prefix="hivemind-") as tmp:
        workdir = Path(tmp)
        command = hivemind_command(
            python, upstream_url, workdir / "hivemind.db", rpm=rpm, tpm=tpm, max_concurrency=max_concurrency
        )
        async with serve_process(command, HIVEMIND_URL, "/_health", workdir) as url:
            yield url


@contextlib.asynccontextmanager
async def stigmergy_proxy(
    upstream_url: str, *, rpm: int | None = None, tpm: int | None = None, max_concurrency: int | None = None
) -> AsyncIterator[str]:
    """Ours, ``stigmergy proxy`` with its defaults plus ``--rpm``/``--tpm``/``--max-in-flight``
    (``max_concurrency``), run as :func:`hivemind_proxy` is.

    Yields the base URL (OpenAI clients: ``base_url + "/v1"``). Ours uses the limits
    only until the upstream's rate-limit headers say otherwise.
    """
    with tempfile.TemporaryDirectory(prefix="stigmergy-proxy-") as tmp:
        command = stigmergy_command(upstream_url, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
        async with serve_process(command, STIGMERGY_URL, "/_stigmergy/health", Path(tmp)) as url:
            yield url


# -- the smoke run ---------------------------------------------------------------------------------

SMOKE_MOCK = MockConfig(rpm=60, p502=0.08, p_reset=0.05)
MAX_TOKENS = 16
DETAIL_CHARS = 160
EXPECTED_TEXT = "".join(reply_words(min(MAX_TOKENS, SMOKE_MOCK.output_tokens)))
PROXY_STATS = {"stigmergy": "/_stigmergy/metrics", "hivemind": "/_stats"}
ProxyFactory = Callable[[str], contextlib.AbstractAsyncContextManager[str]]  # upstream URL -> base URL


@dataclass(frozen=True)
class Reply:
    shape: str  # openai or anthropic
    stream: bool
    status: int | None  # None: no status line (transport error)
    intact: bool  # the reply the mock serves, whole
    detail: str = ""  # for a reply not intact: the start of its body, or the client's exception


async def send(client: httpx.AsyncClient, base_url: str, shape: str, stream: bool, agent: int) -> Reply:
    """One chat call in ``shape``, as an SDK would send it."""
    messages = [{"role": "user", "content": f"agent {agent}: say something"}]
    payload: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "stream": stream}
    if shape == "openai":
        url, headers = base_url + "/v1/chat/completions", {"authorization": "Bearer sk-smoke"}
    else:
        url, headers = base_url + "/v1/messages", {"x-api-key": "sk-smoke", "anthropic-version": "2023-06-01"}
    headers["x-stigmergy-agent"] = headers["x-hivemind-agent-id"] = f"agent-{agent}"
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            body = await response.aread()
    except httpx.HTTPError as exc:
        return Reply(shape, stream, None, False, f"{type(exc).__name__}: {exc}")
    intact = response.status_code == 200 and reply_text(shape, stream, body) == EXPECTED_TEXT
    detail = "" if intact else body[:DETAIL_CHARS].decode(errors="replace")
    return Reply(shape, stream, response.status_code, intact, detail)


async def burst(base_url: str, requests: int) -> list[Reply]:
    """``requests`` calls at once: OpenAI-shaped but every sixth Anthropic's, every other one streamed."""
    async with httpx.AsyncClient(trust_env=False, timeout=SMOKE_TIMEOUT_S) as client:
        calls = [
            send(client, base_url, "anthropic" if i % 6 == 5 else "openai", i % 2 == 1, i)
            for i in range(requests)
        ]
        return await asyncio.gather(*calls)


async def smoke_one(name: str, proxy: ProxyFactory, mock_url: str, requests: int) -> dict[str, Any]:
    """One proxy's burst against a freshly reset mock: what the clients got and what reached the mock."""
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        (await client.post(mock_url + "/_reset")).raise_for_status()
        async with proxy(mock_url) as base_url:
            start = time.perf_counter()
            replies = await asyncio.wait_for(burst(base_url, requests), SMOKE_TIMEOUT_S + 5)
            seconds = time.perf_counter() - start
            proxy_stats = (await client.get(base_url + PROXY_STATS[name])).json()
        mock_stats = (await client.get(mock_url + "/_stats")).json()
    retries = proxy_stats["retries"] if name == "stigmergy" else proxy_stats["retry"]["total_retries"]
    return {
        "proxy": name,
        "sent": len(replies),
        "client_statuses": dict(sorted(Counter(str(r.status) for r in replies).items())),
        "intact": sum(r.intact for r in replies),
        "streamed": sum(r.stream for r in replies),
        "streamed_intact": sum(r.intact for r in replies if r.stream),
        "not_intact": [asdict(r) for r in replies if not r.intact],
        "proxy_retries": retries,
        "seconds": seconds,
        "mock": mock_stats,
        "proxy_stats": proxy_stats,
    }


async def smoke(requests: int = 48) -> list[dict[str, Any]]:
    """The smoke run: ours, then hivemind, each in front of the same mock, reset in between."""
    python = peer_venv(*HIVEMIND)  # before the mock starts: installing may take minutes
    proxies: dict[str, ProxyFactory] = {
        "stigmergy": lambda url: stigmergy_proxy(url, rpm=SMOKE_MOCK.rpm),
        "hivemind": lambda url: hivemind_proxy(url, rpm=SMOKE_MOCK.rpm, python=python),
    }
    async with serve_mock(SMOKE_MOCK) as mock_url:
        return [await smoke_one(name, proxy, mock_url, requests) for name, proxy in proxies.items()]


def smoke_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per proxy: what its clients got, then what reached the mock."""
    header = ["proxy", "sent", "client statuses", "intact", "streamed intact", "proxy retries"]
    header += ["mock attempts", "mock statuses", "429s", "502s", "resets", "seconds"]
    lines = []
    for r in rows:
        mock = r["mock"]
        lines.append(
            [
                r["proxy"],
                str(r["sent"]),
                " ".join(f"{k}:{n}" for k, n in r["client_statuses"].items()),
                str(r["intact"]),
                f"{r['streamed_intact']}/{r['streamed']}",
                str(r["proxy_retries"]),
                str(mock["attempts"]),
                " ".join(f"{k}:{n}" for k, n in mock["by_status"].items()),
                str(mock["rate_limited"]),
                str(mock["bad_gateway"]),
                str(mock["resets"]),
                f"{r['seconds']:.2f}",
            ]
        )
    return table(header, lines)


def not_intact_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each reply that did not come back whole, by proxy."""
    out = []
    for r in rows:
        for reply in r["not_intact"]:
            kind = f"{reply['shape']} {'streamed' if reply['stream'] else 'non-streamed'}"
            status = "no status" if reply["status"] is None else f"status {reply['status']}"
            detail = " ".join(reply["detail"].split())
            out.append(f"  {r['proxy']}: {kind}: {status}: {detail}")
    return out


# -- stigmergy-scheduler ---------------------------------------------------------------------------


def scheduler_peer_rows(quick: bool = True, *, timeout: float = 900.0) -> list[dict[str, str]]:
    """stigmergy-scheduler against ours on the scheduler workloads: ``bench/scheduler.py --peer``'s rows.

    Each row: workload, metric, ours, peer, ratio (peer / ours, ``>=`` where the peer was
    cut off), as that bench prints them; ``quick`` is its ``--quick --repeats 1``.
    """
    with tempfile.TemporaryDirectory(prefix="scheduler-peer-") as tmp:
        out = Path(tmp) / "scheduler.json"
        command = [sys.executable, str(BENCH / "scheduler.py"), "--peer", "--json", str(out)]
        if quick:
            command += ["--quick", "--repeats", "1"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"bench/scheduler.py --peer took over {timeout:g} s") from None
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"bench/scheduler.py --peer failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        rows: list[dict[str, str]] = json.loads(out.read_text())["comparison"]
    return rows


# -- the command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--smoke", action="store_true", help="a burst through our proxy and hivemind's")
    what.add_argument(
        "--scheduler", action="store_true", help="stigmergy-scheduler on the scheduler workloads"
    )
    parser.add_argument("--requests", type=int, default=48, help="requests in the smoke burst (default 48)")
    parser.add_argument("--full", action="store_true", help="--scheduler: full bench, not --quick")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.smoke:
        rows = asyncio.run(smoke(args.requests))
        mock = ", ".join(f"{k}={getattr(SMOKE_MOCK, k)}" for k in ("rpm", "p502", "p_reset", "seed"))
        print(f"Smoke: {args.requests} requests at once through each proxy to the mock ({mock}),")
        print(f"reset before each; ours and {HIVEMIND[0]} {HIVEMIND[1]}, both given rpm={SMOKE_MOCK.rpm}")
        print()
        print(smoke_table(rows))
        print()
        print(
            '"intact": status 200 and the whole reply the mock serves (streams through to their last event).'
        )
        lines = not_intact_lines(rows)
        if lines:
            print("Not intact:")
            print("\n".join(lines))
        result: Any = rows
    else:
        rows_ = scheduler_peer_rows(quick=not args.full)
        print(f"{STIGMERGY_SCHEDULER[0]} {STIGMERGY_SCHEDULER[1]} against ours (bench/scheduler.py --peer)")
        print()
        print(
            table(["workload", "metric", "ours", "peer", "peer/ours"], [list(r.values()) for r in rows_], 2)
        )
        result = rows_
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
