"""The layers point down: backends <- drafting <- cycle <- control <- engine <- {bench, serve, rl, cli}.

The contract is ``[tool.importlinter]`` in pyproject.toml; this test runs import-linter
on it, so an import that points up (directly or through a chain of imports) fails here
with the chain printed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the contract's module names resolve against the checkout's src/
    monkeypatch.syspath_prepend(str(ROOT / "src"))
    code = importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, f"an import points up a layer:\n{out}"
    assert "layers point down KEPT" in out


def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch, capsys):
    """A copy of the package with one upward import (backends -> engine) breaks the contract."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "ltd", src / "ltd", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    base = src / "ltd" / "backends" / "base.py"
    base.write_text(base.read_text() + "\nfrom ltd.engine import Engine  # noqa: E402  (an upward import)\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(src))
    for name in [m for m in sys.modules if m == "ltd" or m.startswith("ltd.")]:
        monkeypatch.delitem(sys.modules, name)  # grimp must find the copy, not the loaded package (restored after)
    code = importlinter_cli.lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code != 0 and "ltd.backends is not allowed to import ltd.engine" in out
