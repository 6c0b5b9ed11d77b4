"""Results files ship in the repo: paths in them are written relative to the checkout, never absolute."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def repo_relative(value: Any, root: Path) -> Any:
    """`value` (nested dicts/lists/strings) with every path under `root` made relative to it, inside
    strings too (a recorded command line names its paths)."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    if isinstance(value, str):
        return value.replace(prefix, "")
    if isinstance(value, dict):
        return {k: repo_relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v, root) for v in value]
    return value
