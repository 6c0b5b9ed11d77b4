"""The function trainable: one Tune trial = one Ray Train job (Tune over Train), then its evaluation.

    trial params -> job (<sweep>-<trial id>, output under the sweep) -> TorchTrainer.fit()
        (the worker's checkpoint reports reach Tune through TuneReportCallback: the scheduler sees
        step, total, loss_*, and eval/* once the worker reports them)
    -> export -> evaluation-only axes (a Ray task with one worker's resources) -> final tune.report

A restarted trial (resumed sweep) gets the same job name and run dir, so Ray Train restores the
latest checkpoint of its earlier attempt and continues from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from twinflow.train.launcher import build_trainer, prepare_run
from twinflow.train.resolved import resolve_job
from twinflow.tune.config import EvaluationConfig, trial_job
from twinflow.tune.evaluation import evaluate_export
from twinflow.tune.pg_guard import RecordTrainRun

TRIAL_FILE = "trial.json"
EVAL_GRID = "eval_samples.png"


def trials_dir(sweep_dir: str) -> str:
    return str(Path(sweep_dir) / "trials")


def run_trial(params: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """`spec`: sweep name, base job dict, evaluation config, driver cwd, trial output dir, registry."""
    trial_id = tune.get_context().get_trial_id()
    name = f"{spec['sweep']}-{trial_id}"
    job = trial_job(
        spec["base"],
        params,
        name=name,
        output_dir=spec["trials_dir"],
        cwd=spec["cwd"],
        source=f"sweep {spec['sweep']} trial {trial_id}",
    )
    resolved = resolve_job(job)  # the trial's inputs checked, its data manifest read once
    job = resolved.job
    run_dir = prepare_run(job)
    (run_dir / TRIAL_FILE).write_text(
        json.dumps({"trial_id": trial_id, "params": params}, indent=2, default=str)
    )
    callbacks: list = [TuneReportCallback()]
    if spec.get("registry"):
        callbacks.append(RecordTrainRun(spec["registry"], trial_id))
    # trials share the driver's console with Tune's status table: no per-dataset progress bars
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = build_trainer(resolved, run_dir, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.fit()  # a failed run raises TrainingFailedError: the trial errors (resumable)
    train_s = time.perf_counter() - t0
    last = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}

    export = run_dir / "export"
    evaluation = EvaluationConfig.model_validate(spec["evaluation"])
    args = (
        str(export),
        job.model_dump_json(by_alias=True),
        evaluation.model_dump_json(),
        str(run_dir / EVAL_GRID),
    )
    t0 = time.perf_counter()
    if job.cluster.use_gpu:
        # a GPU task outside the trial's own placement group (which holds only the trial's CPU share)
        task = ray.remote(evaluate_export).options(
            num_cpus=job.cluster.cpus_per_worker,
            num_gpus=job.cluster.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        )
        metrics = ray.get(task.remote(*args))
    else:
        # CPU-only: right here, on the CPUs the finished Train run just released (no process start-up)
        metrics = evaluate_export(*args)
    final = {**last, **metrics, "train_s": train_s, "eval_s": time.perf_counter() - t0, "evaluated": 1}
    (run_dir / TRIAL_FILE).write_text(
        json.dumps(
            {"trial_id": trial_id, "params": params, "metrics": final, "export": str(export)},
            indent=2,
            default=str,
        )
    )
    tune.report(final)
