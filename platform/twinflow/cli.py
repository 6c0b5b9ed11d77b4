"""The `twinflow` command. Subcommands import their heavy modules lazily so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from twinflow.config import ConfigError

# Each area mounts its own subcommands: `add_commands(subparsers)` in its `cli` module.
COMMAND_MODULES = [
    ("twinflow.data.cli", "add_data_commands"),
    ("twinflow.eval.cli", "add_commands"),
    ("twinflow.models.cli", "add_commands"),
    ("twinflow.plan.cli", "add_commands"),
    ("twinflow.serve.cli", "add_commands"),
    ("twinflow.tune.cli", "add_commands"),
]


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


def build_parser() -> argparse.ArgumentParser:
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

    for module_name, fn_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if module_name.startswith(str(exc.name) + ".") or exc.name == module_name:  # area not installed
                continue
            raise
        getattr(module, fn_name)(sub)
    return parser


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
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # `--verbose` anywhere on the line (`twinflow train job.yaml --verbose` too)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    args = parser.parse_args([a for a in argv if a not in ("-v", "--verbose")])
    setup_logging(verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
