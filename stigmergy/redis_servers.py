"""Throwaway redis-server processes for tests and benchmarks.

Each listens on a free 127.0.0.1 port with persistence off and is stopped on exit,
so tests never touch a Redis they did not start. Needs ``redis-server`` (and
``redis-cli`` for a cluster) on the PATH; :class:`ConfigurationError` says when they are not.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stigmergy.errors import ConfigurationError

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found in 20000-55000")


def wait_for_ping(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer PING within {timeout}s")


class RedisServer:
    """One redis-server process we own (restartable on the same port)."""

    def __init__(self, port: int, directory: Path, *extra: str) -> None:
        self.port, self.directory, self.extra = port, directory, extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_ping(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        raise ConfigurationError("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(free_port(), Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[str]:
    """A real cluster of ``nodes`` masters; yields a ``redis+cluster://`` URL."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        raise ConfigurationError(
            "redis-server and redis-cli are needed for a cluster (apt-get install redis-server)"
        )
    assert REDIS_CLI is not None
    with tempfile.TemporaryDirectory() as directory:
        servers = []
        try:
            for _ in range(nodes):
                port = free_port()
                node_dir = Path(directory) / str(port)
                node_dir.mkdir()
                server = RedisServer(
                    port,
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                )
                server.start()
                servers.append(server)
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{s.port}" for s in servers),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + 30
            while True:
                info = subprocess.run(
                    [REDIS_CLI, "-p", str(servers[0].port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the test cluster did not become ready: {info}")
                time.sleep(0.1)
            yield f"redis+cluster://127.0.0.1:{servers[0].port}"
        finally:
            for server in servers:
                server.stop()
