"""Ray Tune sweeps over TwinFlow jobs: `tune/*.yaml` -> trials that are Ray Train jobs -> results table,
metric plot, best export. Importing this package does not import Ray (the CLI stays instant)."""

from twinflow.tune.config import EvaluationConfig, SweepConfig, load_sweep

__all__ = ["EvaluationConfig", "SweepConfig", "load_sweep"]
