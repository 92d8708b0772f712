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


def test_demo_runs_and_the_field_prevents_429s() -> None:
    result = subprocess.run([*stigmergy_command(), "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.startswith(("uncoord", "through"))
    }
    uncoordinated_429s, coordinated_429s = int(rows["uncoordinated"][2]), int(rows["through"][4])
    assert coordinated_429s == 0
    assert uncoordinated_429s > 0


def test_version_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "stigmergy 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert main(["demo", "--agents", "0"]) == 2
