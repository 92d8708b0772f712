"""Guard rails for the layout: mapped packages ship, and cannot be imported by their folder names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {
    "stigmergy": "stigmergy",
    "backends": "stigmergy/backends",
    "integrations": "stigmergy/integrations",
}


def source_modules() -> set[str]:
    found = set()
    for folder, installed in MAPPING.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".typed", ".lua"} and "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


@pytest.mark.slow
def test_the_wheel_contains_every_module_of_the_source_tree(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("stigmergy_field-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if not name.startswith("stigmergy_field-")}
    assert source_modules() <= shipped, f"missing from the wheel: {sorted(source_modules() - shipped)}"
    assert "stigmergy/py.typed" in shipped
    assert not any(name.startswith(("backends/", "integrations/", "tests/", "bench/")) for name in shipped)
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "stigmergy = stigmergy.cli:main" in entry_points


def test_mapped_packages_import_under_stigmergy() -> None:
    import stigmergy.backends
    import stigmergy.integrations

    assert Path(stigmergy.backends.__file__).parent.name == "backends"
    assert stigmergy.integrations.__doc__


@pytest.mark.parametrize(
    "statement", ["import backends.memory", "from integrations import x", "import backends"]
)
def test_ruff_bans_importing_the_folders_by_name(tmp_path: Path, statement: str) -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    probe = tmp_path / "probe.py"
    probe.write_text(f"{statement}\n")
    result = subprocess.run(
        [
            ruff,
            "check",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--select",
            "TID251",
            "--no-cache",
            str(probe),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "TID251" in result.stdout, result.stdout + result.stderr
