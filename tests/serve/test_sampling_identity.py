"""One sampling path: the same export, prompt, seed and NFE give bit-identical images through `twinflow
eval` (its Ray Data actor), the demo's sampler and Serve (the engine in-process and `/v1/generate`), for
a flow-matching export (its ODE at r = t with its recorded `sample_guidance`) and a TwinFlow export
(its few-step presets at guidance 0).

The exports are the shipped Fashion-MNIST base (tests/fixtures/fashion_base, flow matching, CFG 2) and
the same weights labelled as a TwinFlow export. Serve runs without row padding here
(`batching.row_stable: false`), so every path calls the model on the same batch shapes: padding's own
contract (an image never depends on its batch mates) is tested in test_engine.py.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.waiting import wait_until
from twinflow.demo import sample_export
from twinflow.eval.job import SampleActor
from twinflow.eval.sampling import resolve_sampler
from twinflow.export_reader import open_export
from twinflow.imaging import to_uint8
from twinflow.method.config import TwinFlowConfig
from twinflow.serve.engine import Item, TextEncoders, load_served_model, run_items

from .helpers import app_args

FASHION_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "fashion_base"
PROMPT = "a photo of a sneaker"
SEED = 1234
ROWS = 2
CASES = [("fm", 4), ("fm", 1), ("tf", 1), ("tf", 2)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("identity")
    fm, tf = root / "fm", root / "tf"
    shutil.copytree(FASHION_BASE, fm)
    shutil.copytree(FASHION_BASE, tf)
    meta = json.loads((tf / "twinflow.json").read_text())
    meta.update(
        method="twinflow", job="identity-twinflow", method_config=TwinFlowConfig().model_dump(by_alias=True)
    )
    (tf / "twinflow.json").write_text(json.dumps(meta))
    return {"fm": fm, "tf": tf}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Serve replica runs (ServeAppConfig.threads)
    yield
    torch.set_num_threads(threads)


class Paths:
    """Each path's model loaded once per export, as the real callers keep them."""

    def __init__(self, exports: dict[str, Path]) -> None:
        self.exports = {k: open_export(p) for k, p in exports.items()}
        self.actors = {
            k: SampleActor([str(p)], [[PROMPT] * ROWS], [resolve_sampler("auto", self.exports[k].method)])
            for k, p in exports.items()
        }
        self.generators = {k: e.generator() for k, e in self.exports.items()}

    def eval_images(self, name: str, nfe: int) -> np.ndarray:
        """What `twinflow eval`'s actor returns for one work unit whose seed is SEED."""
        unit = {"ck": 0, "nfe": nfe, "start": 0, "stop": ROWS, "seed": SEED}
        return to_uint8(
            torch.from_numpy(self.actors[name]({k: np.array([v]) for k, v in unit.items()})["image"])
        )

    def demo_images(self, name: str, nfe: int) -> np.ndarray:
        e = self.exports[name]
        return to_uint8(sample_export(e, self.generators[name], [PROMPT], nfe, seed=SEED, per_prompt=ROWS))


@pytest.fixture(scope="module")
def paths(exports) -> Paths:
    return Paths(exports)


def png_arrays(pngs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(p)))[..., None] for p in pngs])


def test_eval_demo_and_serve_engine_give_the_same_images(exports, paths):
    models = {k: load_served_model(k, str(p), row_stable=False) for k, p in exports.items()}
    assert models["fm"].export.sample_guidance == 2.0 and models["tf"].export.sample_guidance == 0.0
    encoders = TextEncoders()
    seen = {}
    for name, nfe in CASES:
        want = paths.eval_images(name, nfe)
        assert np.array_equal(paths.demo_images(name, nfe), want), (name, nfe, "demo")
        served = run_items(models, encoders, [Item(name, PROMPT, nfe, SEED, ROWS)])[0]
        assert np.array_equal(png_arrays(served.pngs), want), (name, nfe, "serve engine")
        seen[name, nfe] = want
    # the paths agree on samplers that really differ: same weights, other method, other images
    assert not np.array_equal(seen["fm", 1], seen["tf", 1])


@pytest.mark.integration
def test_http_generate_gives_the_eval_images(serve_app, exports, paths):
    import requests
    from ray import serve

    from twinflow.serve.app import build_application

    args = app_args(
        {k: str(p) for k, p in exports.items()},
        batching={"max_batch_images": 16, "batch_wait_timeout_s": 0.002, "row_stable": False},
    )
    idle = {"TwinFlow": {"ray_actor_options": {"num_cpus": 0}}}
    serve.run(
        build_application(args, deployment_options=idle),
        name="twinflow-identity",
        route_prefix="/identity",
        blocking=False,
    )
    try:

        def healthy() -> bool:
            try:
                return requests.get(serve_app + "/identity/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, 90, lambda: "the identity app did not become healthy", interval_s=0.2)
        models = requests.get(serve_app + "/identity/v1/models", timeout=10).json()["models"]
        assert {m["id"]: m["guidance"] for m in models} == {"fm": 2.0, "tf": 0.0}
        for name, nfe in CASES:
            r = requests.post(
                serve_app + "/identity/v1/generate",
                json={"prompt": PROMPT, "model": name, "nfe": nfe, "seed": SEED, "num_images": ROWS},
                timeout=120,
            )
            r.raise_for_status()
            body = r.json()
            assert body["guidance"] == (2.0 if name == "fm" else 0.0)
            got = png_arrays([base64.b64decode(i["data"]) for i in body["images"]])
            assert np.array_equal(got, paths.eval_images(name, nfe)), (name, nfe)
    finally:
        serve.delete("twinflow-identity")
