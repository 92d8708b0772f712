"""The console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stigmergy.cli import main


def stigmergy_command() -> list[str]:
    script = shutil.which("stigmergy", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "stigmergy.cli"]


def test_demo_runs_and_the_field_prevents_failures_and_429s(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    result = subprocess.run(
        [*stigmergy_command(), "demo", "--agents", "10", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {line[:40].strip(): line[40:].split() for line in result.stdout.splitlines()[2:] if line.strip()}
    failures, limited = rows["client-visible failures"], rows["upstream 429s"]
    assert failures[1] == "0" and limited[1] == "0"  # through stigmergy
    assert int(failures[0]) > 0 and int(limited[0]) > 0  # uncoordinated, with the SDKs' retries
    assert rows["calls completed"][-3:] == ["30", "of", "30"]
    assert plot.stat().st_size > 10_000


def test_version_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "stigmergy 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert main(["demo", "--agents", "0"]) == 2
    assert "--agents must be at least 1" in capsys.readouterr().err
