"""The import graph of peftkern, read from the source with `ast` (nothing is imported).

- No import circles between peftkern's modules at module level (imports inside functions are deliberate late
  imports and are not edges).
- `kernels/` (installed as `peftkern.kernels`) imports no reference, op, implementation or family module.
- every family's oracle (`peftkern/<family>/reference.py`) imports only torch, the standard library,
  `peftkern.core.rules` and `peftkern.core.dropout` (the mask's definition).

How an import becomes an edge: `import a.b` is an edge to `a.b`; `from a import x` is an edge to `a` and, when
`a.x` is a module, to `a.x` too. Importing a package is importing its `__init__`. An import of a module's own
enclosing package is not an edge: Python has started that package's `__init__` before any of its modules runs
(the package's own imports of its modules are the edges).
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the op-family folders (peftkern/<family>/: those with an op.py) and the quantized-weight package: kernels never
# import them
FAMILY_FOLDERS = tuple(sorted(d.name for d in (ROOT / "peftkern").iterdir() if (d / "op.py").is_file()))
FAMILIES = FAMILY_FOLDERS + ("quant",)


def _modules() -> dict[str, pathlib.Path]:
    """Module name -> source file, for every module of peftkern (kernels/ as peftkern.kernels)."""
    found = {}
    for package, folder in (("peftkern", ROOT / "peftkern"), ("peftkern.kernels", ROOT / "kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(tree: ast.Module, *, module_level_only: bool):
    """Every Import / ImportFrom node; with module_level_only, not those inside a function (class bodies and
    module-level if/try blocks run at import, so their imports count)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, node) -> list[str]:
    """The modules an import statement of module `name` names (absolute, any package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = name if _is_package(name) else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports_of(name: str, *, module_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for module `name`: peftkern modules as they resolve, anything else by its name."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    out = []
    for node in _imports(tree, module_level_only=module_level_only):
        for target in _targets(name, node):
            if target in ancestors or target == name:
                continue  # already being imported when this module runs
            if target.split(".")[0] != "peftkern" or target in MODULES:
                out.append((target, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    """peftkern module -> the peftkern modules it imports at module level."""
    return {name: {t for t, _ in imports_of(name, module_level_only=True) if t in MODULES} for name in MODULES}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one circle through them."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_circle_through(sorted(component), edges))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _circle_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges[path[-1]] & members):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return component


def _describe(circle: list[str]) -> str:
    return " -> ".join(circle)


def test_the_graph_sees_the_modules_and_their_edges():
    """The reader itself: it finds the packages and resolves relative imports (a broken reader passes anything)."""
    assert {"peftkern", "peftkern.nn", "peftkern.quant", "peftkern.kernels", "peftkern.kernels.lora",
            "peftkern.integrations.peft", "peftkern.bench.runner"} <= set(MODULES)
    edges = graph()
    assert "peftkern.kernels" in edges["peftkern"] and "peftkern.nn" in edges["peftkern"]
    assert "peftkern.nn.lora" in edges["peftkern.nn"]
    assert "peftkern.bench.memory" in edges["peftkern.bench.runner"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(graph())
    assert not found, "module-level import circles:\n" + "\n".join(_describe(c) for c in found)


def _is_bench(name: str) -> bool:
    """peftkern/bench/ and the families' bench modules (peftkern/<family>/bench.py, which bench/registry.py finds)."""
    return name == "peftkern.bench" or name.startswith("peftkern.bench.") or \
        (name.count(".") == 2 and name.endswith(".bench"))


def test_bench_has_no_circles_even_through_late_imports():
    """The bench's runner and memory probe share bench/registry.py; neither imports the other, even inside a
    function (the probe runs as its own process and must not need the runner). The families' bench modules count
    as the bench's: they import its shared helpers, and the registry imports them (by discovery, not by name)."""
    bench = [name for name in MODULES if _is_bench(name) and name != "peftkern.bench"]
    assert "peftkern.lora.bench" in bench and "peftkern.bench.registry" in bench
    edges = {name: {t for t, _ in imports_of(name, module_level_only=False) if t in bench} for name in bench}
    found = circles(edges)
    assert not found, "import circles in peftkern.bench:\n" + "\n".join(_describe(c) for c in found)
    assert "peftkern.bench.runner" not in edges["peftkern.bench.memory"]


def test_import_peftkern_reaches_no_bench_module():
    """`import peftkern` loads no bench code: no family's __init__ (nor anything it imports) imports its bench.py."""
    edges, reached, todo = graph(), set(), ["peftkern"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(edges[name])
    assert "peftkern.lora" in reached
    assert not sorted(filter(_is_bench, reached)), "bench modules on the import path of peftkern"


def _offences(prefix: str, allowed) -> list[str]:
    out = []
    for name in sorted(MODULES):
        if name == prefix or name.startswith(prefix + "."):
            for target, line in imports_of(name, module_level_only=False):
                if not allowed(target):
                    out.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    return out


def _under(target: str, module: str) -> bool:
    return target == module or target.startswith(module + ".")


def test_kernels_import_no_reference_op_implementation_or_family_module():
    forbidden = [f"peftkern.{f}" for f in FAMILIES]
    offences = _offences("peftkern.kernels", lambda t: not any(_under(t, f) for f in forbidden))
    assert not offences, "kernels/ imports what it must not:\n" + "\n".join(offences)


def _reference_may_import(target: str) -> bool:
    top = target.split(".")[0]
    return top == "torch" or top in sys.stdlib_module_names or top == "__future__" \
        or _under(target, "peftkern.core.rules") or _under(target, "peftkern.core.dropout") \
        or target == "peftkern.core"  # `from ..core import rules`


ORACLES = sorted(name for name in MODULES if name.endswith(".reference") and name.count(".") == 2)


def test_every_family_has_an_oracle():
    assert FAMILY_FOLDERS and {f"peftkern.{family}.reference" for family in FAMILY_FOLDERS} == set(ORACLES)


@pytest.mark.parametrize("oracle", ORACLES)
def test_an_oracle_imports_only_torch_the_standard_library_and_the_core_rules(oracle):
    offences = _offences(oracle, _reference_may_import)
    assert not offences, f"{oracle} imports more than torch, the standard library and the core rules:\n" + \
        "\n".join(offences)


def test_no_legacy_layer_packages_remain():
    # the op families used to be cut across peftkern/ops, peftkern/impls and peftkern/reference; each now lives in
    # its own folder, and these packages must not come back
    legacy = [name for name in MODULES if any(_under(name, f"peftkern.{p}") for p in ("ops", "impls", "reference"))]
    assert not legacy, f"legacy layer modules: {legacy}"
