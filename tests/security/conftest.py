"""The security tests' Serve app: one tiny checkpoint (trained here in seconds) and one whose files
vanish after the app is built, deployed at /security on the running Serve instance (tests/serve's, when
that one is up) or on one started here on a free 127.0.0.1 port."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serve's helpers
from serve.helpers import FASHION, free_port, train_tiny

APP = "twinflow-security"
PREFIX = "/security"


@pytest.fixture(scope="module")
def security_app(ray_cluster, tmp_path_factory):
    """(base URL of the app, the local paths of its exports)."""
    import requests
    from ray import serve
    from ray.serve.context import _get_global_client

    from twinflow.serve.app import build_application

    if not FASHION.is_file():
        pytest.skip("Fashion-MNIST is missing: run scripts/setup.sh")
    root = tmp_path_factory.mktemp("security_exports")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tiny(root / "tiny", steps=5, seed=0, metadata={"job": "security-test"})
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "tiny", root / "gone")
    client = _get_global_client(raise_if_no_controller_running=False)
    started = client is None
    if started:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    port = client.http_config.port
    args = {
        "models": [{"id": "tiny", "path": str(root / "tiny")}, {"id": "gone", "path": str(root / "gone")}],
        "limits": {"max_nfe": 4, "body_timeout_s": 30.0, "max_body_readers": 32},
        "batching": {"max_batch_images": 8, "batch_wait_timeout_s": 0.002},
        "auth_token_env": None,
    }
    app = build_application(args, deployment_options={"TwinFlow": {"ray_actor_options": {"num_cpus": 0}}})
    shutil.rmtree(root / "gone")  # its metadata was read at build time; loading it will fail
    serve.run(app, name=APP, route_prefix=PREFIX, blocking=False)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError("the security app did not become healthy in 120 s")
            time.sleep(0.3)
        requests.post(base + "/v1/generate", json={"prompt": "warm up"}, timeout=120).raise_for_status()
        yield base, {"tiny": root / "tiny", "gone": root / "gone"}
    finally:
        if started:
            serve.shutdown()
        else:
            serve.delete(APP)
