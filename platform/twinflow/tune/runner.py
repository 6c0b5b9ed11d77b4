"""Driver side of `twinflow tune`: start (or resume) the Tune experiment, then write the report.

Layout under <storage>/<sweep name>/:
    tuner.pkl, experiment_state-*.json, <trial id>/   Tune's experiment (what `Tuner.restore` reads)
    trials/<sweep>-<trial id>/                         each trial's Ray Train run (checkpoints, logs, export)
    report/                                            results.csv/.md, <metric>_vs_<axis>.png, best/
With s3:// storage the Tune experiment (and the report) live in the bucket; trials train under
`staging_dir` (the training launcher's run dir is local-only).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from twinflow.config import ConfigError
from twinflow.data.embed_cache import ensure_embed_cache
from twinflow.storage import s3_filesystem, upload_dir
from twinflow.train.launcher import ensure_ray
from twinflow.tune.config import Sweep, experiment_path, load_sweep, local_sweep_dir
from twinflow.tune.pg_guard import ReleaseTrialResources, get_registry, registry_name
from twinflow.tune.report import SweepResult, write_report
from twinflow.tune.tracking import SweepTracking
from twinflow.tune.trainable import run_trial, trials_dir


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _filesystem(sweep: Sweep):
    if not sweep.config.is_s3:
        return None
    return s3_filesystem(sweep.config.s3_endpoint)


def _s3_key(uri: str) -> str:
    return uri[len("s3://") :]


def _tune_path(sweep: Sweep, path: str) -> str:
    """With an explicit pyarrow filesystem Tune wants paths in it: bucket/prefix, no scheme."""
    return _s3_key(path) if sweep.config.is_s3 else path


def _exists(sweep: Sweep) -> bool:
    path = experiment_path(sweep)
    if not sweep.config.is_s3:
        return Path(path).exists()
    return _filesystem(sweep).get_file_info(_s3_key(path)).type != pafs.FileType.NotFound


def _wipe(sweep: Sweep) -> None:
    if sweep.config.is_s3:
        fs = _filesystem(sweep)
        try:
            fs.delete_dir(_s3_key(experiment_path(sweep)))
        except FileNotFoundError:
            pass
    shutil.rmtree(local_sweep_dir(sweep), ignore_errors=True)


def build_scheduler(sweep: Sweep):
    cfg = sweep.config
    if cfg.scheduler.type == "none":
        return None
    s = cfg.scheduler
    max_t = s.max_t or (sweep.max_steps() + 1 if s.time_attr == "step" else 10**9)
    return ASHAScheduler(
        time_attr=s.time_attr,
        metric=cfg.scheduler_metric,
        mode=cfg.scheduler_mode,
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def trial_spec(sweep: Sweep, registry: str | None) -> dict[str, Any]:
    return {
        "sweep": sweep.name,
        "base": sweep.base,
        "evaluation": sweep.config.evaluation.model_dump(),
        "cwd": str(sweep.cwd),
        "trials_dir": trials_dir(str(local_sweep_dir(sweep))),
        "registry": registry,
    }


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    resume: bool | None = None,
    fresh: bool = False,
    extra_callbacks: list | None = None,
) -> SweepResult:
    """Run (or resume) the sweep and write its report.

    resume=None: restore when a restorable experiment exists, else start; True: it must exist.
    fresh: delete an earlier experiment of this name first."""
    cfg = sweep.config
    if fresh and resume:
        raise ConfigError("--fresh and --resume exclude each other")
    ensure_ray(sweep.base_job(), address)
    if fresh:
        _wipe(sweep)
    path = experiment_path(sweep)
    fs = _filesystem(sweep)
    can_restore = _exists(sweep) and tune.Tuner.can_restore(_tune_path(sweep, path), storage_filesystem=fs)
    if resume and not can_restore:
        raise ConfigError(f"--resume: no restorable sweep at {path}")
    if _exists(sweep) and not can_restore and not fresh:
        raise ConfigError(
            f"{path} exists but holds no restorable Tune experiment; pass --fresh to replace it"
        )

    base_job = sweep.base_job()
    if base_job.data.embed_cache and base_job.data.embed_text:
        # build the shared text-embedding cache once, before the trials (they would race to build it)
        ensure_embed_cache(base_job.data)

    # every trial records its Train controller and placement groups; the guard releases them when the
    # trial ends (release_placement_groups: false keeps the records but releases nothing: ray#54305 as is)
    registry = registry_name(sweep.name)
    get_registry(registry, create=True)
    local_sweep_dir(sweep).mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=trial_spec(sweep, registry)), dict(cfg.trial_resources)
    )
    # Tune's strict check would reject a training result that lacks an eval/* scheduler metric which
    # only the final (post-training) report carries; metric names were checked by load_sweep instead.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tracking = SweepTracking.of(sweep, trials_dir(str(local_sweep_dir(sweep))))  # MLflow, when configured
    callbacks = ([ReleaseTrialResources(registry)] if cfg.release_placement_groups else []) + list(
        extra_callbacks or []
    )
    callbacks += [tracking] if tracking else []
    if can_restore:
        print(f"[twinflow] resuming sweep {sweep.name} from {path}", flush=True)
        # the RunConfig (callbacks included) comes back from the experiment's tuner.pkl
        tuner = tune.Tuner.restore(
            _tune_path(sweep, path),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        print(
            f"[twinflow] sweep {sweep.name}: {cfg.trial_count()} trial(s) x {len(cfg.evaluation.settings())} "
            f"eval setting(s), at most {cfg.max_concurrent_trials} at a time -> {path}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=cfg.param_space(),
            tune_config=tune.TuneConfig(
                scheduler=build_scheduler(sweep),
                num_samples=cfg.num_samples,
                # an explicit generator (seeded random axes) must carry the concurrency limit itself:
                # Tune ignores TuneConfig.max_concurrent_trials next to a SearchGenerator
                search_alg=BasicVariantGenerator(
                    random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials
                ),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=_tune_path(sweep, cfg.storage.rstrip("/"))
                if cfg.is_s3
                else str(Path(path).parent),
                storage_filesystem=fs,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    try:
        released = ray.get(get_registry(registry).released.remote())
    except Exception:
        released = []
    out = write_report(sweep, grid, local_sweep_dir(sweep) / "report")
    if tracking:
        tracking.tag_best(out.best)
    out.experiment_path = path
    out.resumed = can_restore
    out.released = released
    if cfg.is_s3:
        upload_dir(out.report_dir, f"{path}/report", cfg.s3_endpoint)
    return out


def run_sweep_file(path: str | Path, overrides=(), **kwargs) -> SweepResult:
    return run_sweep(load_sweep(path, overrides), **kwargs)
