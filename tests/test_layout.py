"""The import graph points down: errors / callback -> quant, data, optim, monitoring -> nn ->
models -> train -> config -> recipe -> cli, with no circles between modules."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(__file__), "..", "src", "bitnet_training")
LAYERS = {
    "errors": 0,
    "settings": 0,
    "atomic": 0,
    "callback": 0,
    "quant": 1,
    "data": 1,
    "optim": 1,
    "metrics": 1,
    "monitoring": 1,
    "nn": 2,
    "models": 3,
    "peft": 3,
    "loss": 3,
    "distributed": 3,
    "train": 4,
    "config": 5,
    "recipe": 6,
    "consolidate": 6.5,
    "export": 6.5,
    "planner": 6.5,
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}


def modules() -> dict[str, set[str]]:
    """Each module of the package (dotted, without the package name) and the package
    modules it imports at run time (imports under TYPE_CHECKING do not count)."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            deps = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                    node.body = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = rel.split(".")
                    pkg = base[: len(base) - node.level]
                    target = ".".join([*pkg, node.module] if node.module else pkg)
                    names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                    deps.update(n.strip(".") for n in names)
            graph[rel] = deps
    return graph


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_top_level_module_has_a_layer():
    assert {m.split(".")[0] for m in modules()} <= set(LAYERS)


@pytest.mark.parametrize("module,deps", sorted(modules().items()))
def test_imports_point_down(module, deps):
    if module.endswith("__init__") and "." not in module:
        return  # the package's public API re-exports everything
    up = [d for d in deps if d.split(".")[0] in LAYERS and layer(d) > layer(module)]
    assert not up, f"{module} imports upward: {up}"


def test_no_import_cycles():
    graph = modules()
    known = set(graph)

    def resolve(dep):
        return dep if dep in known else f"{dep}.__init__" if f"{dep}.__init__" in known else None

    edges = {m: {r for d in ds if (r := resolve(d)) and r != m} for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in edges[m]:
            if n.endswith("__init__"):
                continue  # a package's re-exports: its submodules are checked themselves
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, m, n])}")
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])
