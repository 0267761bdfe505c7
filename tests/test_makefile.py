"""The Makefile's housekeeping targets: `make clean` keeps runs and checkpoints, `make clean-logs` removes them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _make(folder, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-f", str(folder / "Makefile"), *targets], cwd=folder,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile beside a run folder, caches and a __pycache__ (no .venv: these targets need none)."""
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ckpt = tmp_path / "logs" / "train" / "runs" / "2026-01-01_00-00-00_ab12" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    for cache in (".cache/cirlab/evalsets", ".pytest_cache", ".ruff_cache", "src/cirlab/__pycache__",
                  "tests/__pycache__"):
        (tmp_path / cache).mkdir(parents=True)
    (tmp_path / "src" / "cirlab" / "module.py").write_text("x = 1\n")
    return tmp_path, ckpt


def test_clean_removes_caches_but_keeps_runs_and_checkpoints(project):
    folder, ckpt = project
    result = _make(folder, "clean")
    assert result.returncode == 0, result.stderr
    assert ckpt.read_bytes() == b"weights"
    for cache in (".cache", ".pytest_cache", ".ruff_cache", "src/cirlab/__pycache__", "tests/__pycache__"):
        assert not (folder / cache).exists(), f"make clean left {cache}"
    assert (folder / "src" / "cirlab" / "module.py").exists()


def test_clean_logs_removes_the_run_folders(project):
    folder, _ = project
    result = _make(folder, "clean-logs")
    assert result.returncode == 0, result.stderr
    assert not (folder / "logs").exists()


def test_help_lists_the_set_up_lint_and_clean_targets_with_their_help_lines():
    result = _make(REPO_ROOT, "help")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip().startswith("make ")}
    for target in ("install", "test", "lint", "clean", "clean-logs"):
        assert target in lines and len(lines[target].split()) > 3, f"make help: no help line for {target}"
    assert "keeps logs/" in lines["clean"] and "DELETE logs/" in lines["clean-logs"]
