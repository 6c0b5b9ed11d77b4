"""No credential in anything a job or sweep writes: a 1-trial sweep and a training job, both on the
session's S3 server with static keys in the environment, then every object in the bucket, every file
under the run and staging dirs, the Ray session's logs and the runtime envs the state API shows are
searched for the access key and the secret."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reliability's job helpers
from reliability.helpers import make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def _secrets() -> dict[str, bytes]:
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    found = {k: os.environ[k].encode() for k in keys}
    assert all(len(v) >= 16 for v in found.values())  # distinctive: a hit is the credential itself
    return found


def _hits(blob: bytes, where: str, secrets: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for name, value in secrets.items() if value in blob]


def _scan_bucket(endpoint: str, bucket: str, secrets: dict[str, bytes]) -> tuple[list[str], int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    hits, count = [], 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            hits += _hits(body, f"s3://{bucket}/{obj['Key']}", secrets)
            count += 1
    return hits, count


def _scan_tree(root: Path, secrets: dict[str, bytes]) -> tuple[list[str], int]:
    hits, count = [], 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                hits += _hits(path.read_bytes(), str(path), secrets)
            except OSError:  # a log file rotated away meanwhile
                continue
            count += 1
    return hits, count


def _sweep_file(tmp_path: Path, shards: Path, bucket: str) -> Path:
    spec = {
        "name": "secrets",
        "base_job": str(REPO / "jobs" / "fashion_twinflow.yaml"),
        "overrides": {
            "data.path": str(shards),
            "data.shuffle_buffer": 32,
            "cluster.num_workers": 1,
            "method.teacher": "online",
            "train.steps": 2,
            "train.micro_batch": 8,
            "train.checkpoint_every": 1,
            "train.log_every": 1,
            "train.init_from": None,
            "eval.prompts": [],
            "output.tensorboard": True,
        },
        "search_space": {"method.lambda": {"grid": [0.2]}},
        "evaluation": {"nfe": [1], "samples": 16, "reference": 16, "grid_images_per_prompt": 1},
        "metric": "eval/fd_nfe1",
        "storage": f"s3://{bucket}/sweeps",
        "staging_dir": str(tmp_path / "sweep-staging"),
    }
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_and_job_on_s3_write_no_credential(
    ray_cluster, fashion_small, tmp_path, s3_server, bucket, monkeypatch
):
    from ray.util import state

    from twinflow.train.launcher import run_job
    from twinflow.tune.config import load_sweep
    from twinflow.tune.runner import run_sweep

    secrets = _secrets()
    monkeypatch.setenv("TWINFLOW_STAGING_DIR", str(tmp_path / "job-staging"))
    job = make_job(
        fashion_small,
        f"s3://{bucket}/runs",
        "secrets-job",
        "cluster.num_workers=1",
        "train.steps=2",
        "train.checkpoint_every=1",
        "output.tensorboard=true",
    )
    result = run_job(job)
    assert result.ok, result.error
    sweep = run_sweep(load_sweep(_sweep_file(tmp_path, fashion_small, bucket)))
    assert sweep.rows, "the sweep's trial reported nothing"

    hits, objects = _scan_bucket(s3_server, bucket, secrets)
    names = {Path(k).name for k in _bucket_keys(s3_server, bucket)}
    # what the scan must have covered: Tune's pickled experiment, Train checkpoints, job files
    assert {"tuner.pkl", "job.json", "summary.json"} <= names, sorted(names)
    assert any(n.startswith("events.out.tfevents") for n in names)
    local_hits, files = _scan_tree(tmp_path, secrets)
    session_dir = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    log_hits, logs = _scan_tree(session_dir / "logs", secrets)
    shown = json.dumps(
        [
            [s.__dict__ if hasattr(s, "__dict__") else s for s in listing]
            for listing in (
                state.list_jobs(detail=True, raise_on_missing_output=False),
                state.list_actors(detail=True, limit=10_000, raise_on_missing_output=False),
                state.list_tasks(detail=True, limit=10_000, raise_on_missing_output=False),
            )
        ],
        default=str,
    ).encode()
    state_hits = _hits(shown, "the state API's jobs, actors and tasks", secrets)
    assert objects > 10 and files > 10 and logs > 0
    assert not hits + local_hits + log_hits + state_hits


def _bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]
