"""`make lint` stays clean: ruff, with the rules of pyproject.toml's [tool.ruff.lint], over src and tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


def _ruff() -> str | None:
    """The ruff executable of this environment (the `lint` extra), else one on PATH, else None."""
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.exists() else shutil.which("ruff")


def test_ruff_finds_no_violations_in_src_and_tests():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[lint]', or make install)")
    result = subprocess.run([ruff, "check", "--no-cache", "src", "tests"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff check src tests (run `make lint`):\n{result.stdout}{result.stderr}"


def test_ruff_is_configured_with_the_rules_make_lint_promises():
    """The rule set lives in pyproject.toml, so `make lint`, pre-commit and this test check the same thing;
    a ruff without configuration would only check pyflakes and a few pycodestyle errors."""
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[lint]', or make install)")
    result = subprocess.run([ruff, "check", "--show-settings", "src/cirlab/__init__.py"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for rule in ("unsorted-imports (I001)", "unused-loop-control-variable (B007)", "unused-import (F401)"):
        assert rule in result.stdout, f"{rule} is not enabled by pyproject.toml [tool.ruff.lint]"
