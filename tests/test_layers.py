"""The rooms import one way: `lint-imports` checks pyproject.toml's layers contract on the source tree.

The rooms sit at the repository root and install as `terarec.<room>`; `platform/` has no __init__.py
(ARCHITECTURE.md says why), and import-linter only walks regular packages. So the check runs on a mirror:
`terarec/<room>/...` with every source file linked in and an __init__.py in every folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ["platform", "core", "api", "actors", "models", "store", "kernels"]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def mirror(target: Path, extra: dict[str, str] | None = None) -> Path:
    """terarec/<room>/... under `target` with links to the sources; `extra` adds files (path -> text)."""
    package = target / "terarec"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for room in ROOMS:
        for source in (ROOT / room).rglob("*.py"):
            link = package / source.relative_to(ROOT)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
        for folder in [package / room, *(package / room).rglob("*")]:
            if folder.is_dir() and not (folder / "__init__.py").exists():
                (folder / "__init__.py").write_text("")
    for path, text in (extra or {}).items():
        (package / path).write_text(text)
    return target


def lint(tree: Path) -> subprocess.CompletedProcess:
    if not os.path.exists(LINT_IMPORTS):
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    return subprocess.run([LINT_IMPORTS, str(ROOT / "pyproject.toml")], cwd=tree, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(tree)}, timeout=300)


def test_rooms_import_one_way(tmp_path):
    result = lint(mirror(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_wrong_way_import_breaks_the_contract(tmp_path):
    """The check can fail: a store module that imports the platform's CLI is reported."""
    result = lint(mirror(tmp_path, {"store/wrong_way.py": "from terarec.platform import cli\n"}))
    assert result.returncode != 0
    assert "terarec.store.wrong_way -> terarec.platform.cli" in result.stdout
