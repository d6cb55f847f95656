"""Imports point one way: schemas <- scorers <- streams; mirror depends only on schemas."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"schemas", "scorers", "streams", "mirror"}
ALLOWED = {
    "schemas": set(),
    "scorers": {"schemas"},
    "mirror": {"schemas"},
    # streams/cli.py mounts the mirror's backfill command under `shadowlens mirror`.
    "streams": {"schemas", "scorers", "mirror"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_packages(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_only_the_cli_reaches_into_mirror():
    users = [p.name for p in (ROOT / "streams").rglob("*.py") if "mirror" in imported_packages(p)]
    assert users == ["cli.py"]
