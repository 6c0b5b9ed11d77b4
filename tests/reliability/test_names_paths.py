"""Defect 3: `name: ..` (or `.`) passed validation and `--fresh` then deleted outside the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.train.config import load_job
from twinflow.train.launcher import prepare_run
from twinflow.train.paths import UnsafePathError, check_remote_run, remove_run_dir
from twinflow.tune.config import SweepConfig

REPO = Path(__file__).resolve().parents[2]
BAD_NAMES = ["..", ".", "/tmp/x", "a/b", "../runs", "-rf", ".hidden", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_job_and_sweep_names_are_plain_identifiers(name):
    with pytest.raises(ConfigError, match="name"):
        load_job(REPO / "jobs" / "fashion_base_fm.yaml", [f"name={name!r}"])
    with pytest.raises(Exception, match="name"):
        SweepConfig.model_validate(
            {
                "name": name,
                "base_job": "jobs/fashion_base_fm.yaml",
                "search_space": {"train.lr": {"grid": [1e-3]}},
            }
        )


def test_good_names_still_load():
    job = load_job(REPO / "jobs" / "fashion_base_fm.yaml", ["name=run-1.v2_a"])
    assert job.name == "run-1.v2_a"


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_fresh_never_leaves_the_run_directory(tmp_path):
    runs = tmp_path / "runs"
    (runs / "keep").mkdir(parents=True)
    (runs / "keep" / "job.json").write_text("{}")
    (tmp_path / "precious.txt").write_text("mine")
    before = _tree(tmp_path)
    for name in ("..", ".", "", "keep/..", str(tmp_path)):
        with pytest.raises(UnsafePathError):
            remove_run_dir(runs, name)
    assert _tree(tmp_path) == before


def test_fresh_refuses_a_symlinked_run_dir_and_a_foreign_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "job.json").write_text("{}")
    (elsewhere / "data.bin").write_text("x")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        remove_run_dir(runs, "linked")
    assert (elsewhere / "data.bin").exists()
    (runs / "notes").mkdir()
    (runs / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafePathError, match="job.json"):
        remove_run_dir(runs, "notes")
    assert (runs / "notes" / "thesis.tex").exists()


def test_fresh_deletes_its_own_run_and_only_it(tmp_path, fashion_small):
    runs = tmp_path / "runs"
    job = load_job(
        REPO / "jobs" / "fashion_base_fm.yaml",
        ["name=mine", f"output.dir={runs}", f"data.path={fashion_small}", "eval.prompts=[]"],
    )
    run = prepare_run(job)
    (run / "stale.txt").write_text("old")
    (runs / "other").mkdir()
    (runs / "other" / "job.json").write_text("{}")
    run = prepare_run(job, fresh=True)
    assert not (run / "stale.txt").exists() and (run / "job.json").is_file()
    assert (runs / "other" / "job.json").is_file()


def test_output_dir_symlink_to_elsewhere_is_refused_by_fresh(tmp_path, fashion_small):
    target = tmp_path / "real"
    target.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (target / "job.json").write_text("{}")
    (runs / "j").symlink_to(target, target_is_directory=True)
    job = load_job(
        REPO / "jobs" / "fashion_base_fm.yaml",
        ["name=j", f"output.dir={runs}", f"data.path={fashion_small}", "eval.prompts=[]"],
    )
    with pytest.raises(UnsafePathError):
        prepare_run(job, fresh=True)
    assert (target / "job.json").is_file()


@pytest.mark.parametrize(
    "uri", ["s3://", "s3://bucket", "s3://bucket/..", "s3://bucket//x", "s3://b/./x", "/local"]
)
def test_remote_deletes_need_a_bucket_and_a_plain_run_prefix(uri):
    with pytest.raises(UnsafePathError):
        check_remote_run(uri)
    assert check_remote_run("s3://bucket/runs/job") == "s3://bucket/runs/job"


def test_missing_data_path_is_one_line_before_ray(tmp_path, monkeypatch):
    from twinflow.train import launcher

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job whose data path does not exist")

    monkeypatch.setattr(launcher, "ensure_ray", no_ray)
    job_file = REPO / "jobs" / "fashion_base_fm.yaml"
    with pytest.raises(ConfigError) as err:
        launcher.run_job_file(job_file, [f"data.path={tmp_path / 'nope'}", f"output.dir={tmp_path}"])
    assert str(err.value) == f"{job_file}: data.path: {tmp_path / 'nope'} does not exist"
    assert not (tmp_path / "fashion_base_fm").exists()
