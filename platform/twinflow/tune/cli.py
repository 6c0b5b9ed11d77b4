"""`twinflow tune tune/<name>.yaml`: a Ray Tune sweep whose trials are Ray Train jobs.

The commands import the sweep config, runner and path checks when run: `twinflow tune --help` stays
free of torch and Ray (the sweep config imports the job config, the runner Ray Tune)."""

from __future__ import annotations

import argparse


def _tune(args: argparse.Namespace) -> int:
    from twinflow.tune.config import load_sweep

    # an invalid sweep (or axis, or --job-set) fails here, before anything starts
    sweep = load_sweep(args.sweep, args.set, job_overrides=args.job_set)
    check_sweep_paths(sweep)
    cfg = sweep.config
    if args.dry_run:
        print(f"[twinflow] sweep {cfg.name}: valid; base job {sweep.base_job_path}")
        print(
            f"  trials          {cfg.trial_count()} (num_samples {cfg.num_samples}), "
            f"at most {cfg.max_concurrent_trials} at a time"
        )
        for key, axis in cfg.search_space.items():
            print(f"  {key:<15} {axis.kind} {getattr(axis, axis.kind)}")
        print(
            f"  eval settings   {', '.join(s.suffix for s in cfg.evaluation.settings())} "
            f"(evaluator {cfg.evaluation.evaluator})"
        )
        print(
            f"  metric          {cfg.metric} ({cfg.mode}); scheduler {cfg.scheduler.type}"
            + (f" on {cfg.scheduler_metric}" if cfg.scheduler.type != "none" else "")
        )
        from twinflow.tune.runner import experiment_path

        print(f"  storage         {experiment_path(sweep)}")
        return 0
    from twinflow.tune.runner import run_sweep

    result = run_sweep(sweep, address=args.address, resume=True if args.resume else None, fresh=args.fresh)
    return 0 if result.best is not None else 1


def check_sweep_paths(sweep) -> None:
    """Under `ray job submit`: inputs the working-dir upload left out, and a storage or staging dir
    inside Ray's runtime-env folder (deleted after the job), fail here with what to pass instead."""
    from twinflow.train.paths import check_not_in_runtime_env

    job = sweep.base_job()
    for field, path in (("data.path", job.data.path), ("train.init_from", job.train.init_from)):
        check_not_in_runtime_env(field, path or "", must_exist=True, flag="--job-set", cwd=sweep.cwd)
    cfg = sweep.config
    check_not_in_runtime_env("storage", cfg.storage, must_exist=False, cwd=sweep.cwd)
    if cfg.is_s3:
        check_not_in_runtime_env("staging_dir", cfg.staging_dir, must_exist=False, cwd=sweep.cwd)


def add_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="run a Ray Tune sweep YAML (each trial a Ray Train job)", description=__doc__
    )
    p.add_argument("sweep", help="path to a sweep YAML, e.g. tune/fashion_lambda_nfe.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a sweep field, e.g. --set num_samples=2 (repeatable)",
    )
    p.add_argument(
        "--job-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a job field in every trial, e.g. --job-set train.steps=100 (repeatable)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the base job's cluster.address, else a local cluster)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        action="store_true",
        help="resume the interrupted sweep (default when <storage>/<name> holds one)",
    )
    g.add_argument("--fresh", action="store_true", help="delete an earlier sweep of this name and start over")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials, start nothing")
    p.set_defaults(func=_tune)
    return p
