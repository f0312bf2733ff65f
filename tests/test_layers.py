"""The sans-IO rule: stun/ and core/ import no I/O, clock or outer layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "turnserver"
FORBIDDEN = {
    "asyncio",
    "socket",
    "time",
    "selectors",
    "uvloop",
    "turnserver.io",
    "turnserver.ops",
    "turnserver.cli",
    "logging",
    "prometheus_client",
}


@pytest.mark.parametrize("layer", ["stun", "core"])
def test_sans_io_layers_import_no_io(layer: str) -> None:
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in FORBIDDEN and not any(
                    name == f or name.startswith(f + ".") for f in FORBIDDEN
                ), f"{path.name} imports {name}"


def test_stun_imports_nothing_from_core() -> None:
    for path in (PACKAGE / "stun").glob("*.py"):
        assert "turnserver.core" not in path.read_text(), path.name
