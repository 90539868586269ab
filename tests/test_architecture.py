"""The package's shape. The layer rules live once, as import-linter contracts in pyproject.toml
([tool.importlinter]): `lint-imports` checks them here. This file adds what lint-imports cannot see:
imports of the compiled extension _C and modules loaded by name with importlib, both checked against
the same layer order; no import cycle between any two modules (function-level imports and imports
between modules of one layer included); and no module over 400 lines."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pareto_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
PKG_DIR = os.path.dirname(pareto_lora.__file__)
MAX_LINES = 400

with open(PYPROJECT, "rb") as _f:
    CONTRACTS = tomllib.load(_f)["tool"]["importlinter"]["contracts"]
LAYERS_CONTRACT = next(c for c in CONTRACTS if c["type"] == "layers" and c.get("containers") == ["pareto_lora"])


def _layer_ranks(layers: list[str]) -> dict[str, int]:
    """Top-level module -> rank (0 = the bottom layer), from a layers contract's list (top first)."""
    ranks = {}
    for rank, layer in enumerate(reversed(layers)):
        for name in layer.replace(":", "|").split("|"):
            ranks[name.strip().strip("()")] = rank
    return ranks


LAYERS = _layer_ranks(LAYERS_CONTRACT["layers"])
# The compiled extension has no .py file, so lint-imports does not see it: it is the cpp backend's
# compiled half, importable by the backends layer and above.
EXTENSIONS = {"pareto_lora._C": "backends"}


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
KNOWN = MODULES.keys() | EXTENSIONS.keys()


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
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in KNOWN]
    return found if len(found) == len(node.names) else [target, *found]


def _loads_by_name(tree) -> list[str]:
    """Modules a file loads by name: in a file that calls importlib.import_module or __import__, every
    string constant that names a module inside the package (e.g. a registry's table of backend modules)."""
    calls = any(isinstance(n, ast.Call) and (getattr(n.func, "attr", None) == "import_module"
                                             or getattr(n.func, "id", None) in ("import_module", "__import__"))
                for n in ast.walk(tree))
    if not calls:
        return []
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in KNOWN and "." in n.value]


def _deps(name: str, source: str, is_pkg: bool) -> tuple[set[str], set[str]]:
    """(statically imported, loaded by name) package modules of one file, at any depth in it."""
    tree = ast.parse(source)
    static = set()
    for node in ast.walk(tree):  # every import, at module level or inside functions
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            static.update(_resolve(name, is_pkg, node))
    return static - {name}, set(_loads_by_name(tree)) - {name}


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    graph, by_name = {}, {}
    for name, path in MODULES.items():
        with open(path) as f:
            static, loaded = _deps(name, f.read(), path.endswith("__init__.py"))
        graph[name], by_name[name] = static | loaded, loaded
    return graph, by_name


GRAPH, LOADED_BY_NAME = _graph()


def _layer(module: str) -> int:
    if module in EXTENSIONS:
        return LAYERS[EXTENSIONS[module]]
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else len(LAYERS)  # the package itself: above every layer


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first search, as the cycle it closes ("a -> b -> a")."""
    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = "grey"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if color.get(d) == "grey":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d in graph and d not in color:
                visit(d)
        stack.pop()
        color[m] = "black"

    for m in sorted(graph):
        if m not in color:
            visit(m)
    return cycles


def _lint_imports(config: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    exe = exe if os.path.exists(exe) else shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extra (import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(PKG_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, config, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_lint_imports_keeps_every_contract():
    res = _lint_imports(PYPROJECT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in res.stdout, res.stdout


def test_lint_imports_can_fail(tmp_path):
    # The same layers upside down must break: the contracts are really evaluated on this package.
    upside_down = {**LAYERS_CONTRACT, "layers": list(reversed(LAYERS_CONTRACT["layers"]))}
    lines = ["[tool.importlinter]", 'root_package = "pareto_lora"', "[[tool.importlinter.contracts]]"]
    lines += [f"{k} = {json.dumps(upside_down[k])}" for k in ("name", "type", "containers", "layers", "ignore_imports")]
    (tmp_path / "upside_down.toml").write_text("\n".join(lines) + "\n")
    res = _lint_imports(str(tmp_path / "upside_down.toml"))
    assert res.returncode == 1 and "BROKEN" in res.stdout, res.stdout + res.stderr


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} <= set(LAYERS)


def test_extension_and_by_name_imports_only_go_down():
    # lint-imports checks every import statement; these are the imports it cannot see.
    unseen = [(m, d) for m, deps in GRAPH.items() for d in deps if d in EXTENSIONS or d in LOADED_BY_NAME[m]]
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m, d in unseen if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_the_graph_sees_loads_by_name_and_the_extension():
    src = 'import importlib\nTABLE = {"x": "pareto_lora.ops"}\ndef f(k):\n    from .. import _C\n    return importlib.import_module(TABLE[k])\n'
    assert _deps("pareto_lora.backends.demo", src, False) == ({"pareto_lora._C"}, {"pareto_lora.ops"})
    assert _deps("pareto_lora.backends.demo", src.replace("importlib.import_module", "getattr"), False)[1] == set()


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle():
    # The check above must be able to fail: a cycle through a function-level import between two
    # modules of one layer, resolved by the same code that builds GRAPH, is found.
    units = _deps("pareto_lora.flat.units", "def f():\n    from . import layout\n", False)[0]
    layout = _deps("pareto_lora.flat.layout", "from .units import build_units\n", False)[0]
    assert units == {"pareto_lora.flat.layout"} and layout == {"pareto_lora.flat.units"}
    graph = {**GRAPH, "pareto_lora.flat.units": units, "pareto_lora.flat.layout": layout}
    assert "pareto_lora.flat.layout -> pareto_lora.flat.units -> pareto_lora.flat.layout" in _cycles(graph)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    with open(MODULES[name]) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f"{name}: {lines} lines (> {MAX_LINES}); split it by job"


def _outside_the_package() -> dict[str, str]:
    """Python files of the tests, benchmarks, tools, examples and docs hooks (the limit holds there too)."""
    found = {}
    for top in ("tests", "bench", "tools", "examples", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    found[os.path.relpath(path, ROOT)] = path
    return found


OUTSIDE = _outside_the_package()


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_file_size_outside_the_package(name):
    with open(OUTSIDE[name]) as f:
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
