"""The layout is the architecture: stages import only earlier stages, shared modules and the runtime.

Every ``import`` in ``edgetl/`` is read from the AST, inside functions too. A module may import:
modules of an earlier layer; modules of its own stage package (without cycles); never a later stage,
never a private name (``_x``) of another module. The device runtime imports nothing else of edgetl
(test_imports.py checks that it runs without torch, TensorFlow and click).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "edgetl"
# Pipeline order. Shared modules first (they import only each other); the orchestrators last.
LAYERS = [
    ["errors"],
    ["config", "subproc"],
    ["rundir"],
    ["targets", "charts"],
    ["data"],
    ["train"],
    ["quantize"],
    ["export"],
    ["check"],
    ["package"],
    ["ontarget"],
    ["report"],
    ["pipeline"],
    ["search"],
    ["demo"],
    ["render"],
    ["cli"],
    ["__main__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of ``edgetl.X.Y``: the stage package or top-level module X."""
    return module.split(".")[1] if module.count(".") else ""


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every edgetl import in ``path``, at any depth."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "edgetl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "edgetl":
                continue
            names = [a.name for a in node.names]
            if target == "edgetl":  # from edgetl import X: X is a module unless it is __version__
                found += [(node.lineno, f"edgetl.{n}", []) for n in names if n != "__version__"]
            else:
                found.append((node.lineno, target, names))
    return found


def violations() -> list[str]:
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        mine = unit(me)
        for line, target, names in imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            theirs = unit(target)
            graph.setdefault(me, set()).add(target)
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and target != me:
                problems.append(f"{where}: private name(s) {', '.join(private)} imported from {target}")
            if mine == "runtime":
                if theirs != "runtime":
                    problems.append(f"{where}: the device runtime imports {target}")
                continue
            if theirs == mine or not theirs:
                continue
            if theirs == "runtime":
                continue
            if theirs not in RANK or mine not in RANK:
                problems.append(f"{where}: {mine or me} or {theirs} has no layer in test_layering.LAYERS")
            elif RANK[theirs] >= RANK[mine]:
                problems.append(f"{where}: {mine} (layer {RANK[mine]}) imports {target} (layer {RANK[theirs]})")
    return problems + cycles(graph)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Import cycles between modules (a package counts as its __init__)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_stages_import_only_earlier_stages_without_cycles_or_private_names():
    assert violations() == []


def test_the_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The test is not vacuous: a data module that imports the export stage is reported."""
    planted = PACKAGE / "data" / "_planted_for_test.py"
    planted.write_text("def f():\n    from edgetl.export.artifacts import export\n")
    try:
        found = violations()
    finally:
        planted.unlink()
    assert any("_planted_for_test.py:2: data" in p and "imports edgetl.export.artifacts" in p for p in found), found


def test_every_top_level_name_has_a_layer():
    units = {p.stem if p.parent == PACKAGE else p.parent.name for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units - {"runtime"} <= set(RANK), units - set(RANK)
