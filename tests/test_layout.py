"""Rules of the package layout (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cirlab"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join([*package, base] if base else package)
            found.append((base, [alias.name for alias in node.names]))
    return found


def test_the_sources_were_found():
    assert len(SOURCES) > 40 and (PACKAGE / "checkpoints.py") in SOURCES


def test_no_library_module_imports_an_entry_point():
    offenders = [f"{module_name(path)} imports {target}" for path in SOURCES if "cli" not in path.parts
                 for target, _ in imports(path) if target == "cirlab.cli" or target.startswith("cirlab.cli.")]
    assert not offenders, offenders


def test_entry_points_are_the_cli_modules():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module.startswith("cirlab.cli."), f"{name} -> {target}"
        path = PACKAGE / "cli" / f"{module.rsplit('.', 1)[1]}.py"
        assert f"def {function}(" in path.read_text(), f"{name}: {path} has no {function}()"


def test_torch_load_is_called_in_the_checkpoint_module_only():
    callers = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                callers.append(module_name(path))
    assert set(callers) == {"cirlab.checkpoints"}, callers


def test_no_private_name_crosses_a_module_boundary():
    offenders = [f"{module_name(path)}: from {target} import {name}" for path in SOURCES
                 for target, names in imports(path) if target.startswith("cirlab")
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


def test_networks_do_not_depend_on_lightning_or_training_code():
    for path in sorted((PACKAGE / "archs").glob("*.py")):
        for target, _ in imports(path):
            assert not target.startswith(("lightning", "cirlab.models", "cirlab.data", "cirlab.training")), \
                f"{module_name(path)} imports {target}"


@pytest.mark.parametrize("folder", ["src", "conf", "tests", "docs", "notebooks"])
def test_nothing_points_at_method_notes_outside_the_repository(folder):
    outside = "METHOD" + ".md"  # spelt apart so this file does not match itself
    hits = [str(path.relative_to(REPO)) for path in (REPO / folder).rglob("*")
            if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".ipynb", ".txt"}
            and outside in path.read_text(errors="replace")]
    assert not hits, hits


def test_the_architecture_notes_map_every_module():
    notes = (REPO / "docs" / "architecture.md").read_text()
    missing = [module_name(path) for path in SOURCES if path.name != "__init__.py"
               and not re.search(rf"\b{re.escape(path.relative_to(PACKAGE).as_posix())}\b", notes)
               and path.relative_to(PACKAGE).as_posix() not in notes]
    assert not missing, f"docs/architecture.md does not mention {missing}"
