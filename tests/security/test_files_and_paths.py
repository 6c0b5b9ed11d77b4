"""What the platform deletes and writes on disk: `tune --fresh` touches only a sweep's own folder,
staging is private per user, JSON lands whole, exports are group-readable, and `export --out`
replaces only an export."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from twinflow.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _sweep(tmp_path: Path, storage: Path | str, name: str = "sw"):
    from twinflow.tune.config import load_sweep

    spec = {
        "name": name,
        "base_job": str(REPO / "jobs" / "fashion_twinflow.yaml"),
        "search_space": {"method.lambda": {"grid": [0.2]}},
        "storage": str(storage),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_sweep(path)


def _fresh(monkeypatch, sweep):
    """`twinflow tune --fresh` up to its deletion (Ray is not started: the guard comes first)."""
    from twinflow.tune import runner

    monkeypatch.setattr(runner, "ensure_ray", lambda *a, **k: None)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(runner, "_exists", stop)  # reached only after the deletion
    try:
        runner.run_sweep(sweep, fresh=True)
    except Stop:
        return


def test_tune_fresh_refuses_what_no_sweep_made(tmp_path, monkeypatch):
    home = tmp_path / "home"
    victim = home / "sw"
    victim.mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    # `storage: ~`-style root: <storage>/<name> is a folder that holds no sweep
    with pytest.raises(ConfigError, match="holds no sweep.json"):
        _fresh(monkeypatch, _sweep(tmp_path, home))
    assert (victim / "thesis.tex").is_file()


def test_tune_fresh_refuses_a_symlinked_sweep_dir(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "tuner.pkl").write_bytes(b"x")  # even one that looks like a sweep
    (target / "keep.txt").write_text("keep")
    storage = tmp_path / "st"
    storage.mkdir()
    (storage / "sw").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        _fresh(monkeypatch, _sweep(tmp_path, storage))
    assert (target / "keep.txt").is_file()


def test_tune_fresh_deletes_a_marked_sweep(tmp_path, monkeypatch):
    storage = tmp_path / "st"
    for marker in ("sweep.json", "tuner.pkl"):
        run = storage / "sw"
        (run / "trials").mkdir(parents=True)
        (run / marker).write_text("{}")
        _fresh(monkeypatch, _sweep(tmp_path, storage))
        assert not run.exists() and storage.is_dir()


def test_tune_fresh_on_s3_refuses_an_unmarked_prefix(tmp_path, monkeypatch, s3_server, bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="sweeps/sw/data.bin", Body=b"precious")
    with pytest.raises(ConfigError, match="not a sweep"):
        _fresh(monkeypatch, _sweep(tmp_path, f"s3://{bucket}/sweeps"))
    assert s3.get_object(Bucket=bucket, Key="sweeps/sw/data.bin")["Body"].read() == b"precious"
    s3.put_object(Bucket=bucket, Key="sweeps/sw/tuner.pkl", Body=b"x")
    _fresh(monkeypatch, _sweep(tmp_path, f"s3://{bucket}/sweeps"))
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="sweeps/sw/")


def test_staging_is_private_per_user(tmp_path, monkeypatch):
    import tempfile

    from twinflow.train.staging import UnsafeStagingError, staging_root

    monkeypatch.delenv("TWINFLOW_STAGING_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = staging_root()
    assert root.parent == tmp_path.resolve() and str(os.getuid()) in root.name
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    root.rmdir()
    # another user's planted symlink (or an open folder) at that name is refused, not followed
    (tmp_path / "theirs").mkdir()
    root.symlink_to(tmp_path / "theirs")
    with pytest.raises(UnsafeStagingError, match="symlink"):
        staging_root()
    root.unlink()
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    with pytest.raises(UnsafeStagingError, match="open to other users"):
        staging_root()
    monkeypatch.setenv("TWINFLOW_STAGING_DIR", str(tmp_path / "link"))
    (tmp_path / "link").symlink_to(tmp_path / "theirs")
    with pytest.raises(UnsafeStagingError, match="symlink"):
        staging_root()


def test_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from twinflow.train.summary import read_summary, write_summary

    path = tmp_path / "summary.json"
    write_summary(path, {"state": "FINISHED", "steps": 4})
    before = path.read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_summary(path, {"state": "ERRORED", "steps": 5})
    assert path.read_text() == before and read_summary(path)["state"] == "FINISHED"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_atomic_json_keeps_the_usual_file_mode(tmp_path):
    from twinflow.atomic_files import write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"x": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_exports_are_readable_by_the_group(tmp_path):
    import torch

    from twinflow.models import ModelConfig, build_generator, save_generator

    torch.manual_seed(0)
    gen = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=8))
    old = os.umask(0o027)  # a typical service umask: group may read, others nothing
    try:
        out = save_generator(gen, tmp_path / "export", {"method": "flow_matching"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for p in out.rglob("*"):
        assert p.stat().st_mode & stat.S_IRGRP, p


def test_export_out_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path, monkeypatch):
    from twinflow.models import export_converters as interop

    monkeypatch.setattr(interop, "read_metadata", lambda path: {"family": "qwen_image"})
    monkeypatch.setattr(interop, "check_pipeline_meta", lambda meta, what: None)
    out = tmp_path / "out"
    (out / "diffusers").mkdir(parents=True)
    (out / "diffusers" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a diffusers export"):
        interop.convert_export(tmp_path / "model", ["diffusers"], out)
    assert (out / "diffusers" / "notes.txt").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (out / "diffusers_lora").symlink_to(tmp_path / "other")
    with pytest.raises(ValueError, match="symlink"):
        interop.convert_export(tmp_path / "model", ["diffusers_lora"], out)
