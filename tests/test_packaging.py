"""cirlab as an installed package: a wheel carries the Hydra tree and composes from anywhere;
the declared licence matches LICENSE; declared dependencies match the imports; pyiqa is the
``iqa`` extra and its absence is a clear error."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# what a wheel is built from (the rest of the checkout is not package input)
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "src", "conf"]


def _build_wheel(tmp_path: Path) -> Path:
    """Build cirlab's wheel from a copy of the checkout (the tree itself stays free of build/)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    # a machine's own overrides (git-ignored) must not travel in a wheel
    (source / "conf" / "local" / "default.yaml").write_text("paths:\n  data_dir: /somewhere/private\n")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = dist.glob("cirlab-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, site folder): the wheel installed into a throw-away folder, no source tree in it."""
    tmp_path = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return wheel, site


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run this interpreter with only the installed copy of cirlab importable ahead of site-packages."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CIRLAB_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_the_config_tree_but_not_local_overrides(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {name.removeprefix("cirlab/conf/") for name in names if name.startswith("cirlab/conf/")}
    expected = {str(path.relative_to(REPO_ROOT / "conf")) for path in (REPO_ROOT / "conf").rglob("*.yaml")
                if path.parent.name != "local"}
    assert expected and expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    assert not any(name.startswith("local/") and name.endswith(".yaml") for name in shipped)
    assert "cirlab/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_an_installed_wheel_composes_a_training_config_away_from_the_checkout(installed, tmp_path):
    _, site = installed
    script = (
        "import cirlab, cirlab.config as c\n"
        "print(cirlab.__file__)\n"
        "print(c.CONFIG_DIR)\n"
        "cfg = c.compose_job('train', ['experiment=cresmd_small', 'logger=csv'], 'run')\n"
        "c.validate_config(cfg)\n"
        "print(cfg.model.net._target_, cfg.trainer.max_steps)\n"
    )
    result = _run_installed(site, tmp_path, "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, config_dir, summary = result.stdout.strip().splitlines()[-3:]
    assert Path(module_file).is_relative_to(site), "cirlab was imported from the checkout, not the wheel"
    assert Path(config_dir) == site / "cirlab" / "conf"
    assert summary.startswith("cirlab.archs.cresmd.CResMDNet")


def test_the_installed_train_entry_point_finds_its_primary_config(installed, tmp_path):
    """``cirlab-train --cfg job`` of a wheel install (Hydra's config_path is the packaged tree)."""
    _, site = installed
    result = _run_installed(site, tmp_path, "-m", "cirlab.cli.train", "--cfg", "job", "model=cresmd_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MissingConfigException" not in result.stderr
    assert "CResMDNet" in result.stdout and "max_steps" in result.stdout


def test_declared_licence_matches_the_license_file():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert "LICENSE" in project["license-files"]
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")


# --------------------------------------------------------------------------- dependencies
def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files of src/cirlab importing it (absolute imports, any depth)."""
    found: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "src" / "cirlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "cirlab" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_every_module_cirlab_imports_is_a_declared_dependency():
    """Nothing may arrive only as a dependency of a dependency (numpy, Pillow, tqdm came through pyiqa)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= _requirement_names(extra)
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        names = {_normalise(dist) for dist in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_pyiqa_is_the_iqa_extra_and_make_install_includes_it():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "pyiqa" not in _requirement_names(project["dependencies"])
    assert "pyiqa" in _requirement_names(project["optional-dependencies"]["iqa"])
    # `make test` installs the extra, so the suite keeps covering NIQE/BRISQUE
    install = [line for line in (REPO_ROOT / "Makefile").read_text().splitlines() if "pip install -e" in line]
    assert install and all("iqa" in line for line in install)


@pytest.mark.parametrize("cls_name", ["NIQE", "BRISQUE"])
def test_a_missing_pyiqa_names_the_extra(monkeypatch, tmp_path, cls_name):
    from cirlab.metrics import iqa

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # what an install without the extra looks like
    with pytest.raises(ModuleNotFoundError, match=r"cirlab\[iqa\]") as error:
        getattr(iqa, cls_name)(weights_dir=tmp_path)
    assert cls_name in str(error.value)


def test_a_model_asking_for_iqa_fails_at_construction_without_pyiqa(monkeypatch):
    """Before any training or evaluation starts (RestorationModule builds its metrics in __init__)."""
    from cirlab.models.cresmd import CResMD

    monkeypatch.setitem(sys.modules, "pyiqa", None)
    net = {"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": 8, "nb": 1}
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'cirlab\[iqa\]'"):
        CResMD(net=net, optimizer=optimizer, test_iqa=True)
    CResMD(net=net, optimizer=optimizer, test_iqa=False)  # everything else works without pyiqa
