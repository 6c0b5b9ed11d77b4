"""Real runs logged to a real MLflow server (tests/tracking/conftest.py), read back with MLflow's client:
a 2-worker Ray Train job (DeepSpeed, gloo) and a 2-trial lambda sweep (Tune over Train)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from twinflow.train.launcher import run_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reliability's job helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tune"))  # the sweep file tests/tune runs
from reliability.helpers import make_job
from sweep_files import make_sweep

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of the run, recursively."""
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.timeout(900)  # the session's Ray, shards and MLflow server start inside it
def test_a_training_job_logs_params_metrics_grids_and_export(
    ray_cluster, fashion_small, tmp_path, mlflow_server
):
    job = make_job(
        fashion_small,
        tmp_path,
        "tracked",
        "eval.prompts=[a photo of a sneaker, a photo of a bag]",
        "eval.nfe=[1]",
        "eval.images_per_prompt=2",
        "eval.every=2",
        "eval.metrics=false",
        f"tracking.mlflow={{tracking_uri: '{mlflow_server}', experiment: jobs, log_export: true}}",
    )
    result = run_job(job)
    assert result.ok, result.error
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("jobs")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    # the whole resolved job, dotted
    p = run.data.params
    assert p["name"] == "tracked" and p["train.steps"] == "4" and p["cluster.num_workers"] == "2"
    assert p["data.path"] == str(fashion_small) and p["tracking.mlflow.experiment"] == "jobs"
    # every logged step (log_every 1), once
    history = client.get_metric_history(run.info.run_id, "total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 4
    files = artifacts(client, run.info.run_id)
    assert {"samples/step_000002.png", "samples/step_000004.png", "samples/final.png", "job.json"} <= files
    assert "export/twinflow.json" in files and any(f.startswith("export/transformer/") for f in files)
    assert run.data.tags["twinflow.export"] == str(Path(result.run_dir) / "export")
    # the run's grid is the file the job wrote
    local = client.download_artifacts(run.info.run_id, "samples/final.png", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (Path(result.run_dir) / "samples" / "final.png").read_bytes()


@pytest.mark.timeout(1200)
def test_a_sweep_logs_one_run_per_trial_and_tags_the_best(
    ray_cluster, fashion_small, tmp_path, tmp_path_factory, mlflow_server
):
    from twinflow.tune.config import load_sweep
    from twinflow.tune.runner import run_sweep

    path = make_sweep(
        tmp_path,
        fashion_small,
        "tracked-sweep",
        {"method.lambda": {"grid": [0.0, 0.5]}},
        cache=tmp_path_factory.mktemp("embed_cache"),
        tracking={"mlflow": {"tracking_uri": mlflow_server, "experiment": "sweeps"}},
    )
    result = run_sweep(load_sweep(path))
    assert result.best is not None

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_lambda = {float(r.data.params["method.lambda"]): r for r in runs}
    assert sorted(by_lambda) == [0.0, 0.5]
    for r in runs:
        trial = r.data.tags["twinflow.trial_id"]
        assert (
            r.info.run_name == f"tracked-sweep-{trial}" and r.data.tags["twinflow.sweep"] == "tracked-sweep"
        )
        assert r.data.params["evaluation.nfe"] == "[1, 2]"
        # the judged metrics per NFE, and the training metrics of every reported step
        assert r.data.metrics["eval/fd_nfe1"] > 0 and r.data.metrics["eval/fd_nfe2"] > 0
        assert {m.step for m in client.get_metric_history(r.info.run_id, "total")} >= {2, 4}
        assert {"eval_samples.png", "trial.json"} <= artifacts(client, r.info.run_id)
    best = [r for r in runs if r.data.tags.get("twinflow.best") == "true"]
    assert len(best) == 1 and best[0].data.tags["twinflow.trial_id"] == result.best["trial_id"]
    assert best[0].data.metrics["eval/fd_nfe1"] == min(r.data.metrics["eval/fd_nfe1"] for r in runs)
    assert (
        client.get_experiment(exp.experiment_id).tags["twinflow.best_run." + "tracked-sweep"]
        == best[0].info.run_id
    )


@pytest.mark.timeout(600)
def test_a_job_whose_tracking_server_is_unreachable_trains_and_says_so_once(
    ray_cluster, fashion_small, tmp_path
):
    from reliability.helpers import logged_steps

    from .conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = make_job(
        fashion_small, tmp_path, "untracked", f"tracking.mlflow={{tracking_uri: '{uri}', experiment: e}}"
    )
    result = run_job(job)
    assert result.ok, result.error
    run = Path(result.run_dir)
    assert logged_steps(run) == [1, 2, 3, 4] and (run / "export" / "twinflow.json").is_file()
    said = [line for line in (run / "logs" / "progress.log").read_text().splitlines() if "tracking" in line]
    assert len(said) == 1 and uri in said[0] and "training continues without tracking" in said[0]


@pytest.mark.timeout(600)
def test_a_restarted_attempt_continues_its_run(tmp_path, mlflow_server):
    """Rank 0 of a restarted attempt (same run dir) reopens the run instead of opening a second one."""
    from twinflow.train.config import load_job
    from twinflow.train.tracking import JobTracker

    job = load_job(
        REPO / "jobs" / "fashion_twinflow.yaml",
        ["name=restarted", f"tracking.mlflow={{tracking_uri: '{mlflow_server}', experiment: restarts}}"],
    )
    said: list[str] = []
    first = JobTracker.for_rank(job, tmp_path, 0, said.append)
    first.log_metrics(1, {"total": 2.0})  # the attempt dies here, without finish()
    second = JobTracker.for_rank(job, tmp_path, 0, said.append)
    second.log_metrics(2, {"total": 1.0})
    second.finish(None)
    assert second.run.run_id == first.run.run_id and len(said) == 1  # "tracking: MLflow run ..." once
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("restarts").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method.lambda"] == str(job.method.lambda_)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "total")] == [1, 2]
