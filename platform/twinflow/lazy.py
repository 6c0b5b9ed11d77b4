"""Package names that load their module on first use, so importing a package stays cheap: `twinflow
--help`, job validation and `twinflow.models.config` never import torch, Ray or diffusers."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_names(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for a package whose `names` map to the modules defining them.
    A loaded name is cached in the package's namespace, so the module is looked up once."""
    exported = sorted(names)

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return exported

    return __getattr__, __dir__, exported
