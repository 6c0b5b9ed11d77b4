"""Experiment tracking on an MLflow server: the `tracking:` section of a job or sweep, and the run that
rank 0 of a training job (or the sweep driver, per trial) logs to.

A job run gets the whole resolved job as params (dotted keys, e.g. `method.lambda`), the metrics of
every logged step, the sample grids as they are written, and at the end the export's `twinflow.json`
(the whole export too with `log_export: true`) and its path as the tag `twinflow.export`.

Tracking is never a reason to lose a run: the first failed call (an unreachable server, a refused
login) says so once, and the run trains on without tracking. Credentials come from the environment
only, read by MLflow itself (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` or
`MLFLOW_TRACKING_TOKEN`); a tracking URI carrying a user or password is refused, so none is ever
written to a job file, a run directory or a log.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from twinflow.config import StrictModel

# MLflow's own HTTP defaults retry for minutes against a dead server; a training run asks once, briefly.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch bounds
MAX_METRICS_PER_CALL = 1000
MAX_PARAM_CHARS = 6000
RUN_ID_FILE = "mlflow_run_id"


class MlflowConfig(StrictModel):
    """Where runs go: an MLflow tracking server and one experiment (created when missing)."""

    tracking_uri: str = Field(
        description="http(s)://host:port of the MLflow server (credentials: MLFLOW_TRACKING_* env vars)"
    )
    experiment: str = Field(min_length=1, description="experiment name; created when missing")
    run_name: str | None = Field(None, description="default: the job's name (a sweep: <sweep>-<trial id>)")
    log_export: bool = Field(
        False,
        description="upload the whole export dir as artifacts (off by default: a 20B export is tens of "
        "GB); its twinflow.json and path are always logged",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.username or parts.password:  # checked first: the value is never echoed then
            raise ValueError(
                "the URI carries a user or password: put credentials in MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r}: give the server's address as http://host:port or https://host")
        return v.rstrip("/")


class TrackingConfig(StrictModel):
    """`tracking:` in a job or sweep YAML; empty (the default) tracks nothing."""

    mlflow: MlflowConfig | None = None


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, JSON text values (lists stay one param)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:MAX_PARAM_CHARS]
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class MlflowRun:
    """One MLflow run, every call guarded: after the first failure it says so once and goes quiet."""

    def __init__(self, cfg: MlflowConfig | None, say: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, say
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.active = cfg is not None

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.active:
            return None
        try:
            return fn()
        except Exception as exc:
            self.active = False
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            self.say(
                f"tracking off: MLflow at {self.cfg.tracking_uri} failed to {what} "
                f"({type(exc).__name__}: {detail}); training continues without tracking"
            )
            return None

    def _client(self):
        if self.client is None:
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        return self.client

    def experiment(self) -> str | None:
        def find_or_create() -> str:
            client = self._client()
            exp = client.get_experiment_by_name(self.cfg.experiment)
            return exp.experiment_id if exp is not None else client.create_experiment(self.cfg.experiment)

        if self.experiment_id is None:
            self.experiment_id = self._guard("open the experiment", find_or_create)
        return self.experiment_id

    def start(
        self, run_name: str, params: Mapping[str, str], tags: Mapping[str, str], resume_id: str | None = None
    ) -> str | None:
        """Create the run (or reopen `resume_id`, a restarted attempt's) and log its params."""
        if self.experiment() is None:
            return None

        def create() -> str:
            client = self._client()
            if resume_id:
                try:
                    run = client.get_run(resume_id)
                    if run.info.experiment_id == self.experiment_id:
                        client.update_run(resume_id, status="RUNNING")
                        return resume_id
                except Exception as exc:
                    if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                        raise
            run = client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
            items = sorted(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                chunk = [Param(k, v) for k, v in items[i : i + MAX_PARAMS_PER_CALL]]
                client.log_batch(run.info.run_id, params=chunk)
            return run.info.run_id

        self.run_id = self._guard("start a run", create)
        return self.run_id

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = numeric(metrics)
        if self.run_id is None or not values:
            return

        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, int(step)) for k, v in sorted(values.items())]
            for i in range(0, len(items), MAX_METRICS_PER_CALL):
                self._client().log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_CALL])

        self._guard("log metrics", log)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None and Path(path).exists():
            if Path(path).is_dir():
                self._guard(
                    "upload artifacts",
                    lambda: self._client().log_artifacts(self.run_id, str(path), artifact_path),
                )
            else:
                self._guard(
                    "upload an artifact",
                    lambda: self._client().log_artifact(self.run_id, str(path), artifact_path),
                )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is not None:
            self._guard(
                "tag the run", lambda: [self._client().set_tag(self.run_id, k, v) for k, v in tags.items()]
            )

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._guard("end the run", lambda: self._client().set_terminated(self.run_id, status=status))


class JobTracker:
    """What a training loop calls on rank 0 (other ranks get one that does nothing)."""

    def __init__(self, run: MlflowRun, run_dir: Path | None) -> None:
        self.run, self.run_dir = run, run_dir

    @classmethod
    def for_rank(cls, job, run_dir: Path, rank: int, say: Callable[[str], None] = print) -> JobTracker:
        """Start (or, on a restarted attempt, reopen) the job's run on rank 0."""
        cfg = job.tracking.mlflow if rank == 0 else None
        tracker = cls(MlflowRun(cfg, say), Path(run_dir))
        if cfg is None:
            return tracker
        id_file = tracker.run_dir / "logs" / RUN_ID_FILE
        resume = id_file.read_text().strip() if id_file.is_file() else None
        dumped = job.model_dump(mode="json", by_alias=True)
        run_id = tracker.run.start(
            cfg.run_name or job.name,
            flat_params(dumped),
            {"twinflow.job": job.name, "twinflow.run_dir": str(run_dir)},
            resume_id=resume,
        )
        if run_id is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
            if run_id != resume:
                say(f"tracking: MLflow run {run_id} in experiment {cfg.experiment!r} at {cfg.tracking_uri}")
                job_file = tracker.run_dir / "job.json"
                if job_file.is_file():
                    tracker.run.log_artifact(job_file)
        return tracker

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log_metrics(step, metrics)

    def log_samples(self, grid: Path) -> None:
        """A sample grid just written (`samples/*.png`), under the run's `samples/` artifacts."""
        self.run.log_artifact(grid, "samples")

    def finish(self, export_dir: Path | None) -> None:
        """The export (its path, metadata and, with log_export, the files), then the run ends."""
        if export_dir is not None and Path(export_dir).is_dir():
            self.run.set_tags({"twinflow.export": str(export_dir)})
            if self.run.cfg is not None and self.run.cfg.log_export:
                self.run.log_artifact(export_dir, "export")
            else:
                self.run.log_artifact(Path(export_dir) / "twinflow.json", "export")
        self.run.end()
