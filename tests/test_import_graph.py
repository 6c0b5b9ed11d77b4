"""No import cycles inside `twinflow`, and imports only point down the layers of docs/architecture.md.
Read with `ast` (nothing is imported), every import counts, at module top or inside a function,
except those under `if TYPE_CHECKING:` (never run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "twinflow"
# Bottom to top (docs/architecture.md): a subpackage or top-level module imports only from layers
# below its own (and from itself).
LAYERS = [
    {"config", "storage", "imaging", "lazy", "atomic_files"},
    {"method", "models"},
    {"data", "exports"},
    {"eval"},
    {"train"},
    {"tune", "serve", "plan"},
    {"demo"},
    {"cli"},
    {"__main__"},
]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the twinflow modules it imports (`from a import b` is a.b when that is a module)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
                continue
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                deps |= {full} if full in modules else ({base} if base in modules else set())
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_twinflow_has_no_import_cycles():
    graph = import_graph()
    assert "twinflow.method.sampler" in graph and "twinflow.serve.engine" in graph
    found = cycles(graph)
    assert not found, "import cycles (each group imports itself through the others): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    bad = []
    for module, deps in sorted(graph.items()):
        here = _part(module)
        for dep in sorted(deps):
            there = _part(dep)
            if there == here or there == "twinflow":
                continue
            if here not in rank or there not in rank:
                bad.append(f"{module} -> {dep}: put {here if here not in rank else there} in a layer")
            elif rank[there] >= rank[here]:
                bad.append(f"{module} -> {dep}")
    return bad


def test_imports_point_down_the_layers():
    found = layer_violations(import_graph())
    assert not found, "imports against the layering of docs/architecture.md: " + "; ".join(found)
