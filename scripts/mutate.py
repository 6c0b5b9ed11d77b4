"""Mutation check of the core: mutmut changes one thing at a time in the method, the checkpoint restore,
the planner and the serving engine, runs the unit tests that reach it, and lists the changes no test caught.

mutmut imports the package by its path under the project root (`src/` stripped), so the run works in a
staging copy under runs/mutate/ where platform/twinflow sits at src/twinflow: the repository is not changed.
Usage: `make mutate` (or `python scripts/mutate.py [--max-children N] [--minutes M] [--files F ...]
[--tests T ...] [pattern ...]`); it ends with the count of each verdict and the diff of every surviving
mutant. `--files` narrows what is mutated (mutmut then generates and traces only those), `--tests` the
tests run. A run stopped by --minutes keeps its finished verdicts; the next run with the same scope goes
on (another scope starts over).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "runs" / "mutate"

# What is mutated, as paths in the staging copy.
MUTATED = [
    "src/twinflow/method/*",
    "src/twinflow/train/checkpointing.py",
    "src/twinflow/plan/*",
    "src/twinflow/serve/engine.py",
]
# The unit tests that guard them (integration tests are deselected by marker below).
TESTS = [
    "tests/method",
    "tests/plan",
    "tests/reliability/test_checkpoint_verify.py",
    "tests/reliability/test_checkpoint_restore.py",
    "tests/train/test_resume_layout.py",
    "tests/train/test_checkpoint_candidates.py",
    "tests/train/test_averages.py",
    "tests/serve/test_encoder_cache_info.py",
    "tests/serve/test_engine.py",
    "tests/serve/test_sampling_identity.py",
    "tests/serve/test_renoise_isolation.py",
]
COPIED = ["tests", "pipelines", "jobs"]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def stage(fresh: bool, mutated: list[str], tests: list[str]) -> None:
    """The staging copy: src/twinflow, the tests and the data files they read, and a pyproject whose
    pytest section has no pythonpath (mutmut puts its mutated copy first on sys.path itself)."""
    if fresh and STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src = STAGE / "src" / "twinflow"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(REPO / "platform" / "twinflow", src, ignore=ignore)
    for name in COPIED:
        if (STAGE / name).exists():
            shutil.rmtree(STAGE / name)
        shutil.copytree(REPO / name, STAGE / name, ignore=ignore, symlinks=True)
    missing = [t for t in tests if not (REPO / t).exists()]
    if missing:
        raise SystemExit(f"--tests: no such test path {missing}")
    (STAGE / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src/"]\n'
        f"only_mutate = {_toml_list(mutated)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-m", "not integration", "-p", "no:cacheprovider", "-q"]\n'
        f"also_copy = {_toml_list(COPIED)}\n"
        "\n[tool.pytest.ini_options]\n"
        'markers = ["integration: starts a real local Ray cluster, DeepSpeed, Serve or S3 (slower)"]\n'
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--minutes", type=float, default=0, help="stop the run after this long (0: no limit)")
    ap.add_argument("--fresh", action="store_true", help="drop earlier verdicts and start over")
    ap.add_argument(
        "--files",
        nargs="+",
        default=None,
        metavar="PATH",
        help="mutate only these package files or globs, e.g. plan/cli.py 'method/*' (default: the core)",
    )
    ap.add_argument(
        "--tests", nargs="+", default=None, metavar="PATH", help="run these test paths instead of the core's"
    )
    ap.add_argument("patterns", nargs="*", help="mutant name globs, e.g. 'twinflow.method.times*'")
    args = ap.parse_args()

    mutated = [f"src/twinflow/{f}" for f in args.files] if args.files else MUTATED
    for f in mutated:
        if not list((REPO / "platform" / f.removeprefix("src/")).parent.glob(Path(f).name)):
            raise SystemExit(f"--files: {f.removeprefix('src/twinflow/')} names no file of the package")
    tests = args.tests or [t for t in TESTS if (REPO / t).exists()]
    # another scope than the staging copy's last run: its verdicts are of other mutants, start over
    scope = STAGE / "scope.txt"
    changed = scope.exists() and scope.read_text() != "\n".join(mutated + tests)
    stage(args.fresh or changed, mutated, tests)
    scope.write_text("\n".join(mutated + tests))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    mutmut = [sys.executable, "-m", "mutmut"]
    started = time.monotonic()
    run = subprocess.Popen(
        [*mutmut, "run", "--max-children", str(args.max_children), *args.patterns], cwd=STAGE, env=env
    )
    try:
        run.wait(timeout=args.minutes * 60 if args.minutes else None)
    except subprocess.TimeoutExpired:
        run.terminate()
        run.wait(timeout=60)
        print(f"\nstopped after {args.minutes:g} min; finished verdicts are kept in {STAGE}/mutants")
    print(f"\nmutation run: {(time.monotonic() - started) / 60:.1f} min")
    # `mutmut results` lists every mutant not killed, one "name: verdict" a line.
    listing = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=STAGE, env=env, capture_output=True, text=True, check=False
    ).stdout
    verdicts: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, sep, verdict = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            verdicts.setdefault(verdict, []).append(name)
    print("verdicts: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(verdicts.items())))
    for name in verdicts.get("survived", []):  # each survivor's diff
        subprocess.run([*mutmut, "show", name], cwd=STAGE, env=env, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
