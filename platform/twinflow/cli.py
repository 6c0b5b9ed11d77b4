"""The `twinflow` command. Subcommands import their heavy modules lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from twinflow.config import ConfigError

# Each area mounts its own subcommands: `add_commands(subparsers)` in its `cli` module. Only the area
# the command line names is imported (some areas' packages import torch, e.g. `twinflow.tune` through
# `train.config`); the command list of `twinflow --help` comes from the one-line help here.
AREAS = {
    "data": (
        "twinflow.data.cli",
        "add_data_commands",
        "build, inspect and embed image-text / edit-pair shards",
    ),
    "eval": (
        "twinflow.eval.cli",
        "add_commands",
        "score checkpoints per NFE: adherence, Fréchet distance, diversity (Ray Data sampling)",
    ),
    "judges": (
        "twinflow.eval.cli",
        "add_commands",
        "train or check the judge classifiers and the autoencoder feature space used by `twinflow eval`",
    ),
    "export": (
        "twinflow.models.cli",
        "add_commands",
        "convert a TwinFlow export to diffusers / ComfyUI formats",
    ),
    "plan": (
        "twinflow.plan.cli",
        "add_commands",
        "will a job fit its GPUs? per-GPU memory of every ZeRO stage/offload layout (no weights loaded)",
    ),
    "serve": (
        "twinflow.serve.cli",
        "add_commands",
        "serve checkpoints over HTTP (Ray Serve) with a browser playground",
    ),
    "tune": ("twinflow.tune.cli", "add_commands", "run a Ray Tune sweep YAML (each trial a Ray Train job)"),
}


# The command functions import their area when run, so `twinflow --help` imports neither torch nor Ray.


def _train(args: argparse.Namespace) -> int:
    from twinflow.train.launcher import run_job_file

    result = run_job_file(args.job, overrides=args.set, address=args.address, fresh=args.fresh)
    return 0 if result.ok else 1


def _toy(args: argparse.Namespace) -> int:
    from twinflow.method.toy import main as toy_main

    return toy_main([])


def _demo(args: argparse.Namespace) -> int:
    from twinflow.demo import run_demo

    return run_demo(fresh=args.fresh, overrides_base=args.set_base, overrides_twinflow=args.set_twinflow)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command`'s area (train, demo and toy live here); None: the listing only."""
    parser = argparse.ArgumentParser(prog="twinflow", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's own output (workers, Ray Data, Train) and debug lines; "
        "by default it stays in Ray's session log files",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a training job YAML on Ray Train + DeepSpeed")
    p.add_argument("job", help="path to a job YAML, e.g. jobs/fashion_twinflow.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one field, e.g. --set method.lambda=0.33 (repeatable)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: the job's cluster.address, else a local cluster)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="ignore checkpoints of an earlier run with the same name and start at step 0",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "demo",
        help="the main demo: MNIST flow-matching base, then TwinFlow fine-tune, "
        "1-NFE vs 50-NFE grid and judged numbers (~9 min on 2 idle CPU cores)",
    )
    p.add_argument("--fresh", action="store_true", help="start both jobs over instead of resuming")
    p.add_argument(
        "--set-base",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of jobs/mnist_base_fm.yaml (repeatable)",
    )
    p.add_argument(
        "--set-twinflow",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of jobs/mnist_twinflow.yaml (repeatable)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("toy", help="2-D toy: TwinFlow vs flow matching at 1/2/4 NFE")
    p.set_defaults(func=_toy)

    module_name, fn_name, _ = AREAS.get(command or "", (None, None, None))
    if module_name is None:  # a listing (`twinflow --help`, a bad command): names and help, no imports
        for name, (_, _, summary) in AREAS.items():
            sub.add_parser(name, help=summary)
        return parser
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not (module_name.startswith(str(exc.name) + ".") or exc.name == module_name):
            raise
        parser.error(f"'twinflow {command}' is not installed here ({exc.name} is missing)")
    getattr(module, fn_name)(sub)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand a command line names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (not the one at set-up), so a
    redirected or captured stdout still gets our lines."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """Our loggers print `[twinflow] ...` on stdout (INFO; DEBUG with --verbose); the run's Ray
    start-up reads the choice from TWINFLOW_VERBOSE (twinflow.train.launcher.ensure_ray)."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("[twinflow] %(message)s"))
    root = logging.getLogger("twinflow")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        os.environ["TWINFLOW_VERBOSE"] = "1"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    # `--verbose` anywhere on the line (`twinflow train job.yaml --verbose` too)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    args = parser.parse_args([a for a in argv if a not in ("-v", "--verbose")])
    setup_logging(verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
