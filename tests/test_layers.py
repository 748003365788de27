"""The layers point down: backends <- drafting <- cycle <- control <- engine <- {bench, serve, rl, cli}.

The contract is ``[tool.importlinter]`` in pyproject.toml; this test runs import-linter
on it, so an import that points up (directly or through a chain of imports) fails here
with the chain printed. It runs in a subprocess: import-linter configures logging, which
would silence loggers other tests listen to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"


def lint(checkout: Path) -> subprocess.CompletedProcess:
    """import-linter on ``checkout`` (its pyproject.toml and its src/)."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    return subprocess.run([sys.executable, "-c", LINT], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    run = lint(ROOT)
    assert run.returncode == 0, f"an import points up a layer:\n{run.stdout}{run.stderr}"
    assert "layers point down KEPT" in run.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """A copy of the package with one upward import (backends -> engine) breaks the contract."""
    shutil.copytree(ROOT / "src" / "ltd", tmp_path / "src" / "ltd", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "src" / "ltd" / "backends" / "base.py"
    base.write_text(base.read_text() + "\nfrom ltd.engine import Engine  # noqa: E402  (an upward import)\n")
    run = lint(tmp_path)
    assert run.returncode != 0 and "ltd.backends is not allowed to import ltd.engine" in run.stdout, run.stdout + run.stderr
