"""The sans-IO rule: stun/ and core/ import no I/O, clock or outer layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "turnserver"
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
    files = sorted((PACKAGE / layer).rglob("*.py"))
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


# Arrows run one way: cli -> ops -> io -> core -> stun, and client -> stun; testing
# (what tests and benchmarks import) may use any of them, and nothing imports it.
ALLOWED = {
    "stun": set(),
    "core": {"stun"},
    "io": {"core", "stun"},
    "client": {"stun"},
    "ops": {"io", "core", "stun", "client"},
    "cli": {"ops", "io", "core", "stun", "client"},
    "testing": {"cli", "ops", "io", "core", "stun", "client"},
}


def _turnserver_imports(path: Path) -> set[str]:
    """Every turnserver module a file imports, TYPE_CHECKING blocks included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("turnserver.")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("turnserver.")
        ):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def test_arrows_run_one_way() -> None:
    for layer, allowed in ALLOWED.items():
        for path in (PACKAGE / layer).rglob("*.py"):
            for name in _turnserver_imports(path):
                target = name.split(".")[1]
                assert target == layer or target in allowed or target == "__init__", (
                    f"{path.relative_to(PACKAGE)} imports {name}"
                )


def test_no_import_circles_even_under_type_checking() -> None:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        m: {n for n in _turnserver_imports(p) if n in modules and n != m}
        for m, p in modules.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, m, n]))
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_module_over_500_lines() -> None:
    """At most 500 lines, or a module docstring that says why it is longer (and even
    then at most 600)."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        lines = len(text.splitlines())
        name = path.relative_to(PACKAGE)
        if lines > 500:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Longer than 500 lines:" in doc, f"{name} has {lines} lines and no reason"
        assert lines <= 600, f"{name} has {lines} lines"


def test_every_package_says_what_it_holds() -> None:
    """Each package's __init__ opens with a docstring: the folder listing reads like the
    architecture (shared/ARCHITECTURE.md)."""
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 40, f"{init.relative_to(PACKAGE)} does not say what it holds"
