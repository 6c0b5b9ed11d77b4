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
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from twinflow.atomic_files import write_json_atomic
from twinflow.config import ConfigError
from twinflow.data.embed_cache import ensure_embed_cache
from twinflow.storage import s3_filesystem, upload_dir
from twinflow.train.launcher import ensure_ray
from twinflow.train.paths import UnsafePathError, check_remote_run, remove_run_dir
from twinflow.tune.config import Sweep, experiment_path, local_sweep_dir
from twinflow.tune.pg_guard import ReleaseTrialResources, get_registry, registry_name
from twinflow.tune.report import SweepResult, write_report
from twinflow.tune.tracking import SweepTracking
from twinflow.tune.trainable import run_trial, trials_dir

# What marks a folder as a sweep's: ours, written when the sweep starts, or Tune's own experiment file.
SWEEP_MARKERS = ("sweep.json", "tuner.pkl")


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_trial_envs() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trial actor's runtime env, where the
    dashboard, the state API and the runtime-env agent's log show them. Take them off Tune's list:
    trials resolve credentials through the AWS chain like every other worker (twinflow.storage)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(CREDENTIAL_ENV)


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
    """`--fresh`: delete the earlier sweep of this name, with `train --fresh`'s guards: only
    `<storage>/<name>` (and `<staging_dir>/<name>`), proven on the resolved path to be one directory
    inside its root and no symlink, and only when a sweep made it (its marker, or Tune's tuner.pkl)."""
    if sweep.config.is_s3:
        uri = check_remote_run(experiment_path(sweep))
        fs = _filesystem(sweep)
        key = _s3_key(uri)
        if fs.get_file_info(key).type != pafs.FileType.NotFound:
            marked = any(fs.get_file_info(f"{key}/{m}").type == pafs.FileType.File for m in SWEEP_MARKERS)
            if not marked:
                raise UnsafePathError(
                    f"{uri} holds no {' or '.join(SWEEP_MARKERS)}: not a sweep; refusing to delete it"
                )
            fs.delete_dir(key)
    cfg = sweep.config
    # the root is resolved, the sweep's own name is not: a symlink there is refused, never followed
    root = (sweep.cwd / Path(cfg.staging_dir if cfg.is_s3 else cfg.storage).expanduser()).resolve()
    local = root / cfg.name
    marker = next((m for m in SWEEP_MARKERS if (local / m).is_file()), SWEEP_MARKERS[0])
    remove_run_dir(root, cfg.name, marker=marker)


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
    keep_credentials_out_of_trial_envs()
    if fresh:
        try:
            _wipe(sweep)
        except UnsafePathError as exc:
            raise ConfigError(f"--fresh: {exc}") from None
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
    write_json_atomic(
        local_sweep_dir(sweep) / SWEEP_MARKERS[0],
        {"name": sweep.name, "experiment": path, "config": cfg.model_dump(mode="json")},
        indent=2,
        default=str,
    )
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
