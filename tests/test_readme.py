"""The README's code runs as written and prints what it says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_quick_start_runs_and_prints_the_documented_pressure(capsys: pytest.CaptureFixture[str]) -> None:
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert float(lines[0]) == pytest.approx(0.3, rel=1e-3)  # real clock: a few ms of decay
    assert ast.literal_eval(lines[1]) == pytest.approx(
        {"planner": -0.5, "coder": 0.3, "monitor": 0.0}, rel=1e-3
    )
    assert lines[2].startswith("pressure on agent 'coder'")


@pytest.mark.parametrize("index", [1, 2], ids=["scheduler", "transport"])
def test_later_examples_run_and_print_what_the_readme_says(
    index: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[index]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip()
    assert f"prints `{printed}`" in README


def test_setup_commands_are_the_two_documented() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert commands[0].endswith("pip install . && stigmergy demo")
    assert commands[1].endswith("pip install -e '.[dev]' && pytest")
