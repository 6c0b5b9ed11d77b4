"""The `tracking:` section and the guarded MLflow run, without a server (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.train.config import load_job
from twinflow.train.tracking import JobTracker, flat_params

from .conftest import free_port

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ConfigError) as err:
        load_job(
            JOBS / "fashion_twinflow.yaml",
            [
                "tracking.mlflow.tracking_uri=http://alice:hunter2@127.0.0.1:5000",
                "tracking.mlflow.experiment=x",
            ],
        )
    text = str(err.value)
    assert (
        "fashion_twinflow.yaml: tracking.mlflow.tracking_uri:" in text and "MLFLOW_TRACKING_PASSWORD" in text
    )
    assert "hunter2" not in text and "alice" not in text
    with pytest.raises(ConfigError, match="tracking.mlflow.tracking_uri: .*http://host:port"):
        load_job(JOBS / "fashion_twinflow.yaml", ["tracking.mlflow={tracking_uri: 'mlruns', experiment: x}"])
    with pytest.raises(ConfigError, match="tracking.mlflow.experiment"):
        load_job(JOBS / "fashion_twinflow.yaml", ["tracking.mlflow={tracking_uri: 'http://127.0.0.1:1'}"])


def test_params_are_the_whole_job_flattened():
    job = load_job(JOBS / "fashion_twinflow.yaml")
    params = flat_params(job.model_dump(mode="json", by_alias=True))
    assert params["name"] == job.name and params["method.lambda"] == str(job.method.lambda_)
    assert params["eval.nfe"] == str(job.eval.nfe)  # a list stays one param (JSON text)
    assert all("." in k or k == "name" for k in params)


def test_an_unreachable_server_is_reported_once_and_nothing_raises(tmp_path):
    job = load_job(
        JOBS / "fashion_twinflow.yaml",
        [f"tracking.mlflow={{tracking_uri: 'http://127.0.0.1:{free_port()}', experiment: e}}"],
    )
    said: list[str] = []
    grid = tmp_path / "samples" / "final.png"
    grid.parent.mkdir()
    grid.write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker = JobTracker.for_rank(job, tmp_path, 0, said.append)
    tracker.log_metrics(1, {"total": 1.0})
    tracker.log_samples(grid)
    tracker.finish(tmp_path)
    assert len(said) == 1 and "tracking off" in said[0] and "training continues" in said[0]
    assert not (tmp_path / "logs" / "mlflow_run_id").exists()
    # other ranks never talk to the server
    quiet: list[str] = []
    JobTracker.for_rank(job, tmp_path, 1, quiet.append).finish(tmp_path)
    assert quiet == []
