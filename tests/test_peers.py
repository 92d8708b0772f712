"""bench/peers.py: the command lines it builds, its process handling, and how it judges a reply.

Nothing here creates a venv; the one test that runs hivemind needs its venv already built
(``python bench/peers.py --smoke`` builds it) and is skipped otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from stigmergy.mock_api import MockConfig, MockLLMAPI

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def peers() -> Iterator[ModuleType]:
    """bench/peers.py, imported as the bench scripts import each other (bench/ on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("peers")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the harness runs its servers with asyncio's subprocesses


def test_hivemind_command_listens_on_a_free_local_port_with_its_db_where_we_say(
    peers: ModuleType, tmp_path: Path
) -> None:
    python, db = Path("/venv/bin/python"), tmp_path / "hivemind.db"
    command = peers.hivemind_command(python, "http://127.0.0.1:9000", db, rpm=30)
    assert command[:4] == [str(python), "-I", "-c", peers.HIVEMIND_LAUNCHER]
    assert command[4:6] == ["30", ""]
    args = command[6:]
    assert args[:3] == ["--log-level", "INFO", "proxy"]
    flags = dict(zip(args[3::2], args[4::2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "0",
        "--upstream": "http://127.0.0.1:9000",
        "--db": str(db),
    }
    assert "--max-concurrency" not in command
    assert peers.hivemind_command(python, "http://x", db, max_concurrency=8)[-2:] == [
        "--max-concurrency",
        "8",
    ]


@pytest.mark.slow
def test_the_launcher_sets_the_profile_of_the_upstream_then_runs_the_cli_with_its_own_args(
    peers: ModuleType, tmp_path: Path
) -> None:
    fake = tmp_path / "hivemind"
    (fake / "scheduler").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "scheduler" / "__init__.py").write_text("")
    (fake / "scheduler" / "providers.py").write_text(
        "class Profile:\n"
        "    default_requests_per_minute = 60\n"
        "    default_tokens_per_minute = 100_000\n"
        "PROFILE = Profile()\n"
        "def detect_provider(url):\n"
        "    PROFILE.url = url\n"
        "    return PROFILE\n"
    )
    (fake / "__main__.py").write_text(
        "import json, sys\n"
        "from hivemind.scheduler.providers import PROFILE\n"
        "def main():\n"
        "    print(json.dumps([sys.argv[1:], PROFILE.url, PROFILE.default_requests_per_minute,"
        " PROFILE.default_tokens_per_minute]))\n"
    )

    def launch(rpm: str, tpm: str) -> Any:
        args = ["proxy", "--upstream", "http://127.0.0.1:9", "--port", "0"]
        out = subprocess.run(
            [sys.executable, "-c", peers.HIVEMIND_LAUNCHER, rpm, tpm, *args],
            cwd=tmp_path,  # `python -c` puts the working directory first on sys.path: the fake package
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        ).stdout
        return json.loads(out)

    args = ["proxy", "--upstream", "http://127.0.0.1:9", "--port", "0"]
    assert launch("30", "") == [args, "http://127.0.0.1:9", 30, 100_000]
    assert launch("", "5000") == [args, "http://127.0.0.1:9", 60, 5000]


def test_stigmergy_command_gives_ours_the_same_limits(peers: ModuleType) -> None:
    command = peers.stigmergy_command("http://127.0.0.1:9000", rpm=60, tpm=1000, max_concurrency=5)
    assert command[:3] == [sys.executable, "-m", "stigmergy.cli"]
    assert command[3:] == [
        "proxy",
        "--upstream",
        "http://127.0.0.1:9000",
        "--port",
        "0",
        "--log-level",
        "warning",
        "--rpm",
        "60",
        "--tpm",
        "1000",
        "--max-in-flight",
        "5",
    ]
    assert "--max-in-flight" not in peers.stigmergy_command("http://127.0.0.1:9000")  # none: its default


def test_served_url_reads_the_port_each_server_reports(peers: ModuleType) -> None:
    uvicorn = "INFO:     Uvicorn running on http://127.0.0.1:44965 (Press CTRL+C to quit)\n"
    assert peers.served_url("starting\n" + uvicorn, peers.HIVEMIND_URL) == "http://127.0.0.1:44965"
    ours = "stigmergy proxy: http://127.0.0.1:5123 -> http://127.0.0.1:9 (openai)\n"
    assert peers.served_url(ours, peers.STIGMERGY_URL) == "http://127.0.0.1:5123"
    assert peers.served_url("INFO:     Uvicorn running on http://0.0.0.0:80", peers.HIVEMIND_URL) is None


def test_peer_env_drops_python_and_proxy_variables_unless_pip_needs_them(
    peers: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("https_proxy", "http://proxy:3128")
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy:1080")
    env = peers.peer_env()
    assert not {"PYTHONPATH", "https_proxy", "ALL_PROXY"} & set(env)
    assert env["PATH"] == os.environ["PATH"]
    kept = peers.peer_env(keep_proxies=True)
    assert "PYTHONPATH" not in kept
    assert kept["https_proxy"] == "http://proxy:3128"


@pytest.mark.slow
@pytest.mark.anyio
async def test_serve_process_yields_the_url_and_ends_the_process_group(
    peers: ModuleType, tmp_path: Path
) -> None:
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
    pattern = re.compile(r"\((http://127\.0\.0\.1:\d+)/\)")
    async with httpx.AsyncClient(trust_env=False) as client:
        async with peers.serve_process(command, pattern, "/", tmp_path) as url:
            assert (await client.get(url + "/")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await client.get(url + "/")


@pytest.mark.slow
@pytest.mark.anyio
async def test_serve_process_reports_a_server_that_exits_with_its_output(
    peers: ModuleType, tmp_path: Path
) -> None:
    command = [sys.executable, "-c", "print('no such flag: --frobnicate'); raise SystemExit(2)"]
    with pytest.raises(RuntimeError, match=r"exited with 2(.|\n)*no such flag: --frobnicate"):
        async with peers.serve_process(command, peers.HIVEMIND_URL, "/_health", tmp_path):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shape", ["openai", "anthropic"])
async def test_reply_text_reads_the_mocks_replies_and_rejects_cut_streams(
    peers: ModuleType, shape: str, stream: bool
) -> None:
    transport = httpx.ASGITransport(MockLLMAPI(MockConfig()))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": peers.MAX_TOKENS}
    path = "/v1/chat/completions" if shape == "openai" else "/v1/messages"
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        reply = await client.post(path, json=payload | {"stream": stream}, headers={"anthropic-version": "1"})
    body = reply.content
    assert peers.reply_text(shape, stream, body) == peers.EXPECTED_TEXT
    if stream:
        cut = body[: body.rindex(b"data: ")]  # the last event lost, as when a connection resets
        assert peers.reply_text(shape, stream, cut) is None
    assert peers.reply_text(shape, stream, b'{"error": "HiveMind proxy error: "}') is None


@pytest.mark.slow
@pytest.mark.anyio
async def test_hivemind_runs_from_its_venv_with_the_limits_we_give_it(peers: ModuleType) -> None:
    python = peers.cache_dir() / "-".join(peers.HIVEMIND) / "bin" / "python"
    if peers.installed_version(python, peers.HIVEMIND[0]) != peers.HIVEMIND[1]:
        pytest.skip("no hivemind venv; python bench/peers.py --smoke builds it")
    proxy = peers.hivemind_proxy("http://127.0.0.1:9", rpm=30, python=python)
    async with proxy as url, httpx.AsyncClient(trust_env=False) as client:
        stats = (await client.get(url + "/_stats")).json()
    assert stats["rate_limiter"]["rpm_limit"] == 30
    assert stats["rate_limiter"]["tpm_limit"] == 100_000
    assert stats["admission"]["max_concurrency"] == 5
