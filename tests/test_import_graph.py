"""No import cycles inside `twinflow`, and imports only point down the layers of docs/architecture.md.
Read with `ast` (nothing is imported), every import counts, at module top or inside a function,
except those under `if TYPE_CHECKING:` (never run). `importlib.import_module(...)`, `__import__(...)`
and a lazy-export helper's table (DYNAMIC_IMPORTERS) count too: a literal argument names its module;
otherwise the call may reach every twinflow module that a string in the same file names (the
lazy-export tables and the CLI's area table)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "twinflow"
# Bottom to top (docs/architecture.md): a subpackage or top-level module imports only from layers
# below its own (and from itself).
LAYERS = [
    {"config", "storage", "imaging", "lazy", "atomic_files"},
    {"method", "models"},
    {"data", "export_reader"},
    {"eval"},
    {"train"},
    {"tune", "serve", "plan"},
    {"demo"},
    {"cli"},
    {"__main__"},
]


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
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


# Calls that import modules named by strings: importlib's, and a lazy-export helper that takes a
# {name: module} table (`lazy_names`, where a package declares one) and calls import_module itself.
DYNAMIC_IMPORTERS = ("import_module", "__import__", "lazy_names")


def _dynamic_imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Modules reached through `import_module` / `__import__` calls (see the module docstring)."""
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and (
            (isinstance(n.func, ast.Attribute) and n.func.attr in DYNAMIC_IMPORTERS)
            or (isinstance(n.func, ast.Name) and n.func.id in DYNAMIC_IMPORTERS)
        )
    ]
    if not calls:
        return set()

    def named(value: object) -> str | None:
        name = value.split(":", 1)[0] if isinstance(value, str) else None
        return name if name in modules else None

    literal = [c.args[0] for c in calls if c.args and isinstance(c.args[0], ast.Constant)]
    if len(literal) == len(calls):
        return {m for m in (named(a.value) for a in literal) if m}
    return {m for n in ast.walk(tree) if isinstance(n, ast.Constant) for m in [named(n.value)] if m}


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the twinflow modules it imports (`from a import b` is a.b when that is a module)."""
    modules = module_names(package_dir)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        deps = _dynamic_imports(tree, modules)
        for node in _runtime_imports(tree):
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


def _plant(root: Path, files: dict[str, str]) -> Path:
    """A package tree named twinflow under `root`, from {relative path: source}."""
    for rel, source in files.items():
        path = root / "twinflow" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "twinflow"


def test_the_real_graph_is_read():
    graph = import_graph()
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300
    assert "twinflow.method.sampler" in graph["twinflow.serve.engine"]
    # through import_module: the lazy exports and the family registry
    assert "twinflow.models.lora" in graph["twinflow.models"]
    assert "twinflow.models.qwen_image" in graph["twinflow.models.registry"]


def test_a_planted_upward_import_is_found(tmp_path):
    pkg = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "method/__init__.py": "",
            "method/times.py": "def f():\n    from twinflow.serve import engine\n",
            "serve/__init__.py": "",
            "serve/engine.py": "from ..method.times import f\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["twinflow.serve.engine"] == {"twinflow.method.times"}
    assert layer_violations(graph) == ["twinflow.method.times -> twinflow.serve.engine"]
    assert cycles(graph) == [["twinflow.method.times", "twinflow.serve.engine"]]


def test_import_module_calls_count(tmp_path):
    pkg = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": (
                "import importlib\n_LAZY = {'f': 'twinflow.serve.app'}\n"
                "def __getattr__(name):\n    return getattr(importlib.import_module(_LAZY[name]), name)\n"
            ),
            "data/__init__.py": "",
            "data/load.py": "from importlib import import_module\nm = import_module('twinflow.tune.runner')\n",
            "serve/__init__.py": "",
            "serve/app.py": "",
            "tune/__init__.py": "",
            "tune/runner.py": "",
            "eval/__init__.py": "",
            "eval/plain.py": "NAME = 'twinflow.serve.app'  # a string, and no import_module call\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["twinflow.models"] == {"twinflow.serve.app"}
    assert graph["twinflow.data.load"] == {"twinflow.tune.runner"}
    assert graph["twinflow.eval.plain"] == set()
    assert layer_violations(graph) == [
        "twinflow.data.load -> twinflow.tune.runner",
        "twinflow.models -> twinflow.serve.app",
    ]
