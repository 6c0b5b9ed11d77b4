"""Serve tests: two tiny checkpoints trained here in seconds, and one Serve app on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from .helpers import FASHION, app_args, free_port, train_tiny


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """{'tiny': trained 20 steps, 'tiny-edit': 5 more steps, declared edit-capable}."""
    if not FASHION.is_file():
        pytest.skip("Fashion-MNIST is missing: run scripts/setup.sh")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("serve_exports")
        gen = train_tiny(root / "tiny", steps=20, seed=0, metadata={"job": "serve-test"})
        train_tiny(
            root / "tiny-edit",
            steps=5,
            seed=1,
            init=gen,
            metadata={"job": "serve-test-edit", "tasks": ["generate", "edit"]},
        )
    finally:
        torch.set_num_threads(threads)
    return {"tiny": root / "tiny", "tiny-edit": root / "tiny-edit"}


@pytest.fixture(scope="session")
def served(tiny_exports):
    """The same checkpoints loaded in this process the way a model replica loads them."""
    from twinflow.serve.engine import TextEncoders, load_served_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = {mid: load_served_model(mid, str(p), max_rows=16) for mid, p in tiny_exports.items()}
    finally:
        torch.set_num_threads(threads)
    return models, TextEncoders(cache_size=64)


@pytest.fixture(scope="session")
def serve_app(ray_cluster, tiny_exports):
    """The app on a free 127.0.0.1 port: http://127.0.0.1:PORT/ (no auth) and /secure/ (bearer token)."""
    import requests
    from ray import serve

    from twinflow.serve.app import build_application

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # The apps live for the whole session on the shared 4-CPU cluster: they reserve no logical CPU,
        # or later training tests (2 workers + Ray Data's embed actor) could never be scheduled.
        idle = {"TwinFlow": {"ray_actor_options": {"num_cpus": 0}}}
        serve.run(
            build_application(app_args(tiny_exports), deployment_options=idle),
            name="twinflow-test",
            route_prefix="/",
            blocking=False,
        )
        os.environ["TWINFLOW_TEST_TOKEN"] = "s3cret-token"
        try:
            secure = build_application(
                app_args({"tiny": tiny_exports["tiny"]}, auth_token_env="TWINFLOW_TEST_TOKEN"),
                deployment_options=idle,
            )
        finally:
            del os.environ["TWINFLOW_TEST_TOKEN"]
        serve.run(secure, name="twinflow-secure", route_prefix="/secure", blocking=False)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:  # until both apps answer (replicas load the text encoder and models lazily)
            try:
                if (
                    requests.get(base + "/healthz", timeout=5).status_code == 200
                    and requests.get(base + "/secure/healthz", timeout=5).status_code == 200
                ):
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError("Serve apps did not become healthy in 90 s")
            time.sleep(0.2)
        for prefix, model in (("", "tiny"), ("", "tiny-edit"), ("/secure", "tiny")):  # load the models once
            r = requests.post(
                f"{base}{prefix}/v1/generate",
                json={"prompt": "warm up", "model": model},
                headers={"Authorization": "Bearer s3cret-token"},
                timeout=120,
            )
            r.raise_for_status()
        yield base
    finally:
        serve.shutdown()
