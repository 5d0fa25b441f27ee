"""The package's shape: imports point one way, never in a loop, and not too deep.

The graph is read from the source (every ``import`` of a rankscope module, including those
inside functions), so a lazy import cannot hide a loop. Layers, lowest first: a module may
import its own package and any lower layer, never a higher one.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rankscope"
LAYERS = {"errors": 0, "linalg": 1, "store": 1, "train": 2, "analysis": 3, "recommend": 4,
          "export": 4, "outputs": 5, "pipeline": 6, "cli": 7, "__main__": 8, "__init__": 8}
MAX_LEVELS = 7          # packages on the longest chain: cli → pipeline → outputs → recommend →
                        # analysis → train → store (errors, imported by all, and __main__ excluded)
MAX_DEPTH = 10          # modules on the longest chain, __main__ excluded (12 in the flat package)
MAX_LINES = 300         # lines of code in one module (docstrings, comments, blanks excluded)


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the rankscope modules it imports (``from pkg import mod`` counts as mod)."""
    mods = modules()
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rankscope"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rankscope")}
        graph[name] = {d for d in deps if d in mods and d != name and d != "rankscope"}
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain; raises AssertionError naming a loop if there is one."""
    @lru_cache(maxsize=None)
    def chain(node: str, seen: frozenset = frozenset()) -> tuple[str, ...]:
        assert node not in seen, f"import loop through {node}"
        tails = [chain(d, seen | {node}) for d in sorted(graph[node])]
        return (node, *max(tails, key=len, default=()))

    return list(max((chain(n) for n in graph if n != "rankscope.__main__"), key=len))


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph of packages: an arrow where some module of one imports a module of another."""
    def pkg(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "rankscope"

    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(pkg(m), set()).update(pkg(d) for d in deps if pkg(d) != pkg(m))
    return out


def code_lines(path: Path) -> int:
    """Lines that are code: not blank, not a comment, not inside a docstring."""
    tree = ast.parse(path.read_text())
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc |= set(range(body[0].lineno, body[0].end_lineno + 1))
    lines = path.read_text().splitlines()
    return sum(1 for i, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and i not in doc)


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in modules() if len(m.split(".")) > 1 and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the known layers: {unknown}"


def test_imports_point_down_the_layers():
    graph = import_graph()
    up = [f"{m} → {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not up, "imports against the layers:\n" + "\n".join(sorted(up))


def test_no_import_loop_and_a_shallow_graph():
    graph = import_graph()
    chain = longest_chain(graph)
    assert len(chain) <= MAX_DEPTH, f"{len(chain)} modules deep: " + " → ".join(chain)
    packages = {p: d - {"errors"} for p, d in package_graph(graph).items()
                if p not in ("errors", "__main__")}
    levels = longest_chain(packages)
    assert len(levels) <= MAX_LEVELS, f"{len(levels)} levels: " + " → ".join(levels)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_module_is_too_long(path):
    assert code_lines(path) <= MAX_LINES, f"{path} has {code_lines(path)} lines of code"


def test_the_checks_catch_a_loop_and_depth():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    with pytest.raises(AssertionError, match="import loop"):
        longest_chain(graph)
    assert longest_chain({"a": {"b"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
