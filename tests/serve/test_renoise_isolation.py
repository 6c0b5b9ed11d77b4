"""Batch-mates isolation where it matters: a TwinFlow export's 2- and 4-NFE samplers draw fresh noise
between steps, so each request in a batch must re-noise from its own seed. Each request's images in a
mixed batch equal the ones it gets alone, and equal the sampler's output with the request's own
re-noise generator; a shared generator for the batch would give the later rows other noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from twinflow.imaging import png_bytes
from twinflow.method.config import TwinFlowConfig
from twinflow.method.sampler import renoise_generator, sample, seeded_noise, settings_for
from twinflow.serve.engine import Item, TextEncoders, load_served_model, run_items

FASHION_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "fashion_base"


@pytest.fixture(scope="module")
def twinflow_model(tmp_path_factory):
    """The shipped Fashion-MNIST base weights, exported as a TwinFlow model."""
    tf = tmp_path_factory.mktemp("renoise") / "tf"
    shutil.copytree(FASHION_BASE, tf)
    meta = json.loads((tf / "twinflow.json").read_text())
    meta.update(method="twinflow", job="renoise", method_config=TwinFlowConfig().model_dump(by_alias=True))
    (tf / "twinflow.json").write_text(json.dumps(meta))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_served_model("tf", str(tf), max_rows=16), TextEncoders(cache_size=64)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("nfe", [2, 4])
def test_each_request_renoises_from_its_own_seed(twinflow_model, nfe):
    model, enc = twinflow_model
    assert model.export.method == "twinflow" and model.export.sample_guidance == 0.0
    settings = settings_for("twinflow", nfe)
    assert settings.rho > 0, "the preset must re-noise, or this test checks nothing"
    batch = [
        Item("tf", "a photo of a coat", nfe, 11, 3),
        Item("tf", "a photo of a sneaker", nfe, 12, 2),
        Item("tf", "a photo of a bag", nfe, 13, 1),
        Item("tf", "a photo of a sneaker", nfe, 14, 2),
    ]
    together = run_items({"tf": model}, enc, batch)
    assert {r.group_requests for r in together} == {4}  # one group: one model call per step
    shape = tuple(model.generator.sample_shape)
    for item, res in zip(batch, together):
        alone = run_items({"tf": model}, enc, [Item("tf", item.prompt, nfe, item.seed, item.num_images)])[0]
        assert res.pngs == alone.pngs, (nfe, item.seed)
        text = enc.encode([item.prompt], model.text_max_length, model.export.text_encoder_spec)
        cond = {k: v.expand(item.num_images, *v.shape[1:]) for k, v in text.items()}
        want = sample(
            model.model_fn(False),
            seeded_noise(item.num_images, shape, item.seed),
            cond,
            settings=settings,
            generator=renoise_generator(item.seed),
        )
        assert res.pngs == png_bytes(want), (nfe, item.seed)
    # the re-noise is visible in the images: another re-noise seed, same initial noise, other images
    first = batch[0]
    text = enc.encode([first.prompt], model.text_max_length, model.export.text_encoder_spec)
    other = sample(
        model.model_fn(False),
        seeded_noise(first.num_images, shape, first.seed),
        {k: v.expand(first.num_images, *v.shape[1:]) for k, v in text.items()},
        settings=settings,
        generator=renoise_generator(first.seed + 1000),
    )
    assert png_bytes(other) != together[0].pngs
