"""The package's shape: imports only go down the layers, no import cycles (function-level imports
included), and no module over 400 lines. See the layer list in pareto_lora/__init__.py."""

import ast
import os

import pytest

import pareto_lora

PKG_DIR = os.path.dirname(pareto_lora.__file__)
MAX_LINES = 400

# Layer of each top-level module or subpackage; a module may import its own layer and below.
LAYERS = {
    "rules": 0,
    "args": 0,  # scalar argument validation: imports nothing from the package
    "_C": 0,
    "result": 1,
    "checks": 1,
    "reference": 2,
    "archs": 2,  # model architectures: imports nothing from the package
    "backends": 3,
    "ops": 4,
    "flat": 5,
    "distributed": 6,
    "training": 7,
    "app": 8,
    "": 8,  # the package itself (re-exports, the public surface): only the app and __main__ import it
    "__main__": 9,
}
EXTENSIONS = {"pareto_lora._C"}  # compiled: no .py file


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PKG_DIR)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(["pareto_lora", *rel])] = path
    return out


MODULES = _modules()


def _resolve(importer: str, is_pkg: bool, node) -> list[str]:
    """Package-internal modules an import statement names (a `from X import y` names X.y when y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "pareto_lora"]
    if node.level:
        base = importer.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "pareto_lora":
        return []
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES.keys() | EXTENSIONS]
    return found if len(found) == len(node.names) else [target, *found]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path).read(), path)
        deps = set()
        for node in ast.walk(tree):  # every import, at module level or inside functions
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(name, is_pkg, node) if d != name)
        graph[name] = deps
    return graph


GRAPH = _graph()


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} <= set(LAYERS)


def test_imports_only_go_down():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if d in MODULES.keys() | EXTENSIONS
        if _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = "grey"
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if color.get(d) == "grey":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d in GRAPH and d not in color:
                visit(d)
        stack.pop()
        color[m] = "black"

    for m in sorted(GRAPH):
        if m not in color:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle():
    # The checks above must be able to fail: a hand-made cycle through a function-level import.
    tree = ast.parse("def f():\n    from .ops import integrate\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("pareto_lora.rules", False, node) == ["pareto_lora.ops"]
    assert _layer("pareto_lora.ops") > _layer("pareto_lora.rules")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    with open(MODULES[name]) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f"{name}: {lines} lines (> {MAX_LINES}); split it by job"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_says_what_it_is_for(name):
    doc = ast.get_docstring(ast.parse(open(MODULES[name]).read()))
    assert doc and len(doc.split()) >= 4, f"{name}: no module docstring saying what it is for"


def test_the_training_step_does_not_ask_which_sync_it_holds():
    # One contract (pareto_lora.distributed.sync.GradSync): no branching on sync kinds.
    src = open(os.path.join(PKG_DIR, "training", "two_objective.py")).read()
    for kind in ("DDPSync", "FSDPSync", "LocalSync", "isinstance(self._sync"):
        assert kind not in src, kind
