"""A sweep in MLflow: one run per trial in the sweep's experiment, the best trial tagged.

`SweepTracking` is a Tune callback on the driver. A trial's run starts with the trial's axes as params
(e.g. `method.lambda`) and the sweep's evaluation settings (`evaluation.nfe`, ...); every result the
trial reports is logged at its training step (loss and the rest during training, then the judged
`eval/*` metrics per NFE); when the trial ends its sample grid (`eval_samples.png`) and `trial.json`
are uploaded. After the sweep, `tag_best` marks the best trial's run (`twinflow.best = true`) and
names it in the experiment's tag `twinflow.best_run.<sweep>`.

A resumed sweep finds each trial's earlier run by its tags and continues it. Tracking failures are
reported once and never fail the sweep (twinflow.train.tracking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from twinflow.train.tracking import MlflowRun, flat_params

# What Tune adds to every result (bookkeeping, not the trial's measurements): not logged.
TUNE_FIELDS = {
    "step",
    "done",
    "timestamp",
    "pid",
    "time_this_iter_s",
    "time_total_s",
    "time_since_restore",
    "iterations_since_restore",
    "training_iteration",
    "evaluated",
}


class SweepTracking(Callback):
    def __init__(self, sweep, trials_dir: str) -> None:
        cfg = sweep.config
        self.mlflow = cfg.tracking.mlflow
        self.name = cfg.name
        self.trials_dir = trials_dir
        self.params = flat_params(
            {
                "evaluation": cfg.evaluation.model_dump(mode="json"),
                "sweep": {"name": cfg.name, "base_job": cfg.base_job, "metric": cfg.metric, "mode": cfg.mode},
            }
        )
        self._runs: dict[str, MlflowRun] = {}
        self._shared: MlflowRun | None = None

    @classmethod
    def of(cls, sweep, trials_dir: str) -> SweepTracking | None:
        """The callback, or None when the sweep has no `tracking.mlflow`."""
        return cls(sweep, trials_dir) if sweep.config.tracking.mlflow is not None else None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into tuner.pkl: no clients
        return {**self.__dict__, "_runs": {}, "_shared": None}

    def _say(self, text: str) -> None:
        print(f"[twinflow] {text}", flush=True)

    def _one(self) -> MlflowRun:
        """The run handle that finds experiments and runs (one per driver; quiet after a failure)."""
        if self._shared is None:
            self._shared = MlflowRun(self.mlflow, self._say)
        return self._shared

    def _find(self, trial_id: str) -> str | None:
        shared = self._one()
        exp = shared.experiment()
        if exp is None:
            return None
        query = f"tags.`twinflow.sweep` = '{self.name}' and tags.`twinflow.trial_id` = '{trial_id}'"
        runs = shared._guard("find a trial's run", lambda: shared._client().search_runs([exp], query))
        return runs[0].info.run_id if runs else None

    def _run(self, trial) -> MlflowRun | None:
        run = self._runs.get(trial.trial_id)
        if run is None and self._one().active:
            run = MlflowRun(self.mlflow, self._one().say)
            run.client, run.experiment_id = self._one()._client(), self._one().experiment()
            params = {**flat_params(dict(trial.config)), **self.params}
            tags = {"twinflow.sweep": self.name, "twinflow.trial_id": trial.trial_id}
            if run.start(f"{self.name}-{trial.trial_id}", params, tags, resume_id=self._find(trial.trial_id)):
                self._runs[trial.trial_id] = run
            else:
                self._one().active = False  # said once already; stop asking
                return None
        return run

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run = self._run(trial)
        if run is not None:
            step = result.get("step", result.get("training_iteration", 0))
            run.log_metrics(int(step or 0), {k: v for k, v in result.items() if k not in TUNE_FIELDS})

    def _close(self, trial, status: str) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is None:
            return
        trial_dir = Path(self.trials_dir) / f"{self.name}-{trial.trial_id}"
        for name in ("eval_samples.png", "trial.json"):
            run.log_artifact(trial_dir / name)
        run.end(status)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "FAILED")

    def tag_best(self, best: dict[str, Any] | None) -> None:
        """Mark the best trial's run (the report's `best`) in its tags and the experiment's."""
        if best is None:
            return
        run_id = self._find(str(best["trial_id"]))
        shared = self._one()
        if run_id is None:
            return

        def tag() -> None:
            client = shared._client()
            client.set_tag(run_id, "twinflow.best", "true")
            client.set_experiment_tag(shared.experiment(), f"twinflow.best_run.{self.name}", run_id)

        shared._guard("tag the best trial", tag)
