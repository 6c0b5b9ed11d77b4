"""Ray Tune sweeps over TwinFlow jobs: `tune/*.yaml` -> trials that are Ray Train jobs -> results table,
metric plot, best export. Importing this package imports neither Ray nor torch (`twinflow tune --help`
stays instant): the names below load their module on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvaluationConfig": "twinflow.tune.config",
    "SweepConfig": "twinflow.tune.config",
    "load_sweep": "twinflow.tune.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'twinflow.tune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
