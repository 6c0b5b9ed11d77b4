"""Paths under `ray job submit` (issue 17): the driver runs in Ray's unpacked copy of --working-dir
(`runtime_resources/working_dir_files/_ray_pkg_<hash>`), which lacks git-ignored folders and is
deleted after the job. Relative inputs missing there and any output inside it fail before Ray starts,
with the field and the flag to pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.train.config import load_job
from twinflow.train.paths import runtime_env_root
from twinflow.train.resolved import resolve_job as check_inputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def pkg(tmp_path, monkeypatch):
    """A working-dir copy as Ray unpacks it, holding the shipped jobs/ but no data/ or runs/."""
    root = tmp_path / "session_x" / "runtime_resources"
    pkg = root / "working_dir_files" / "_ray_pkg_0123abcd"
    (pkg / "jobs").mkdir(parents=True)
    (pkg / "jobs" / "job.yaml").write_text((REPO / "jobs" / "fashion_base_fm.yaml").read_text())
    monkeypatch.chdir(pkg)
    return pkg


def test_runtime_env_root_is_found_from_the_working_dir_copy(pkg, tmp_path):
    assert runtime_env_root() == pkg.parents[1]
    assert runtime_env_root(tmp_path) is None


def test_a_relative_data_path_missing_from_the_upload_says_what_to_do(pkg, tmp_path):
    job = load_job("jobs/job.yaml", [f"output.dir={tmp_path / 'shared'}"])
    with pytest.raises(ConfigError) as err:
        check_inputs(job)
    msg = str(err.value)
    assert msg.startswith("data.path: 'data/fashion_mnist' is not in that copy")
    assert "git-ignored" in msg and "s3://" in msg and "--set data.path=" in msg


def test_outputs_never_go_into_the_runtime_env_folder(pkg, fashion_small):
    for out in ("runs", str(pkg / "runs"), str(pkg.parents[1] / "elsewhere")):
        job = load_job("jobs/job.yaml", [f"data.path={fashion_small}", f"output.dir={out}"])
        with pytest.raises(
            ConfigError, match=r"^output\.dir: .* which Ray deletes .*--set output\.dir=s3://"
        ):
            check_inputs(job)


def test_shared_paths_and_inputs_inside_the_upload_pass(pkg, fashion_small, tmp_path):
    check_inputs(load_job("jobs/job.yaml", [f"data.path={fashion_small}", f"output.dir={tmp_path / 'runs'}"]))
    (pkg / "small").symlink_to(fashion_small)  # data that travelled with the working dir resolves
    check_inputs(load_job("jobs/job.yaml", ["data.path=small", f"output.dir={tmp_path / 'runs'}"]))


def test_a_sweep_under_job_submit_checks_storage_and_inputs(pkg, fashion_small, tmp_path):
    from twinflow.tune.cli import check_sweep_paths
    from twinflow.tune.config import load_sweep

    (pkg / "tune").mkdir()
    (pkg / "tune" / "s.yaml").write_text(
        "name: s\nbase_job: jobs/job.yaml\nsearch_space: {train.lr: {grid: [0.001]}}\n"
        "metric: eval/fd_nfe1\nmode: min\n"
    )
    with pytest.raises(ConfigError, match=r"^data\.path: .*--job-set data\.path="):
        check_sweep_paths(load_sweep("tune/s.yaml"))
    with pytest.raises(ConfigError, match=r"^storage: 'runs/tune' would write inside"):
        check_sweep_paths(load_sweep("tune/s.yaml", job_overrides=[f"data.path={fashion_small}"]))
    check_sweep_paths(
        load_sweep(
            "tune/s.yaml", [f"storage={tmp_path / 'tune'}"], job_overrides=[f"data.path={fashion_small}"]
        )
    )
