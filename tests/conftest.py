"""Session fixtures shared by every test area: ONE local Ray cluster and ONE moto S3 server per session."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"


# The session's S3 credentials: distinctive values (tests/security scans every written file for them),
# in this process's environment before the local Ray cluster starts, so its workers inherit them the
# way a KubeRay pod gets them from its secret: the platform never forwards credentials itself.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIATF" + secrets.token_hex(7).upper(),
    "AWS_SECRET_ACCESS_KEY": "tfsecret" + secrets.token_hex(16),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session: 4 logical CPUs (2 would starve Ray Data next to actors).

    Started as `twinflow train` starts its own (twinflow.train.launcher.ensure_ray): with a dashboard
    on a free port that RAY_API_SERVER_ADDRESS names for every process, so Ray Train's
    placement-group cleaner asks this cluster's state API (without it: "Failed to query" every
    second, and a live run's workers removed when another cluster's dashboard answers)."""
    import ray

    from twinflow.train.launcher import API_SERVER_ENV

    os.environ.update(S3_CREDENTIALS)
    for attempt in range(2):  # a heavily loaded machine can time out the raylet's first start-up
        if ray.is_initialized():
            break
        port = _free_port()
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        try:
            ray.init(
                num_cpus=4,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                object_store_memory=300 * 1024**2,
                runtime_env={"env_vars": {API_SERVER_ENV: os.environ[API_SERVER_ENV]}},
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    yield ray
    ray.shutdown()
    os.environ.pop(API_SERVER_ENV, None)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-protocol server (moto) on 127.0.0.1 with test credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "TWINFLOW_S3_ENDPOINT")
    }
    os.environ.update(
        **S3_CREDENTIALS,
        AWS_REGION="us-east-1",
        TWINFLOW_S3_ENDPOINT=endpoint,
    )
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def bucket(s3_server, request):
    """A fresh bucket per test (named after it)."""
    import boto3

    name = "tf-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def fashion_small(tmp_path_factory):
    """Fashion-MNIST, 96 train / 32 eval records in 32-record shards (built once per session)."""
    from twinflow.data import build_pipeline, load_pipeline

    out = tmp_path_factory.mktemp("fashion") / "shards"
    cfg = load_pipeline(
        PIPELINES / "fashion_mnist.yaml",
        [f"output={out}", "shard_size=32", "splits.train.count=96", "splits.eval.count=32"],
    )
    build_pipeline(cfg, progress=False)
    return out
