"""The import rules of DESIGN.md, enforced: each package imports only the layers below it, and
the pure core (packets, model, sim, flows, flowstate) never imports I/O, threads or the clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "hivenet"

ALLOWED: dict[str, set[str]] = {
    "packets": set(),
    "model": {"packets"},
    "flows": {"packets"},
    "flowstate": {"packets"},
    "store": {"model", "packets"},
    "sim": {"packets", "model", "flows", "flowstate"},
    "datapath": {"packets", "flows", "model", "flowstate"},
    "nsutil": set(),  # Linux network namespaces: shared by agent and lab, imports no layer
    "agent": {"packets", "model", "store", "sim", "flows", "flowstate", "datapath", "nsutil"},
    "api": {"model", "store", "packets"},
    "lab": {
        "agent",
        "store",
        "model",
        "packets",
        "datapath",
        "api",
        "sim",
        "flows",
        "flowstate",
        "nsutil",
    },
    "cli": {
        "api",
        "lab",
        "agent",
        "model",
        "store",
        "packets",
        "datapath",
        "sim",
        "flows",
        "flowstate",
        "nsutil",
    },
}
PURE = {"packets", "model", "sim", "flows", "flowstate"}
IMPURE_MODULES = {
    "socket",
    "threading",
    "asyncio",
    "time",
    "datetime",
    "subprocess",
    "os",
    "select",
    "selectors",
    "sqlite3",
    "random",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _package_files() -> list[tuple[str, Path]]:
    return [
        (path.relative_to(SRC).parts[0], path)
        for path in sorted(SRC.rglob("*.py"))
        if len(path.relative_to(SRC).parts) > 1
    ]


@pytest.mark.parametrize(("package", "path"), _package_files(), ids=lambda v: str(v))
def test_package_imports_only_allowed_layers(package: str, path: Path) -> None:
    allowed = ALLOWED.get(package, set(ALLOWED))
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "hivenet" or len(parts) < 2:
            continue
        target = parts[1]
        if target == package or target not in ALLOWED:
            continue
        assert target in allowed, f"{path.relative_to(SRC)} imports hivenet.{target}"
    if package in PURE:
        impure = {n.split(".")[0] for n in _imports(path)} & IMPURE_MODULES
        assert not impure, f"pure module {path.relative_to(SRC)} imports {sorted(impure)}"
