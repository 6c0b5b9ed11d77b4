"""Ray Tune sweeps over TwinFlow jobs: `tune/*.yaml` -> trials that are Ray Train jobs -> results table,
metric plot, best export. Importing this package imports neither Ray nor torch (`twinflow tune --help`
stays instant): the names below load their module on first use."""

from __future__ import annotations

from twinflow.lazy import lazy_names

_NAMES = {
    "EvaluationConfig": "twinflow.tune.config",
    "SweepConfig": "twinflow.tune.config",
    "load_sweep": "twinflow.tune.config",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _NAMES)
