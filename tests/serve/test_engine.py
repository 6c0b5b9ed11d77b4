"""The model side without Ray: determinism per seed independent of batch mates, sampler fidelity, caches,
image decoding, schemas and config."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import TEXT_LEN


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cond(encoders, prompts, counts):
    text = encoders.encode(prompts, TEXT_LEN)
    rep = torch.tensor(counts)
    return {k: v.repeat_interleave(rep, dim=0) for k, v in text.items()}


@pytest.mark.parametrize("nfe,guidance", [(1, None), (2, None), (4, None), (2, 1.5)])
def test_batched_requests_get_the_export_sampler_alone(served, nfe, guidance):
    """Each request's images in a batch are what the method's sampler gives it alone, with the sampler
    of the export's method: the tiny exports are flow matching, so their ODE at r = t (what `twinflow
    eval` and the demo use), never TwinFlow's few-step preset."""
    from twinflow.imaging import png_bytes
    from twinflow.method.sampler import renoise_generator, sample, seeded_noise, settings_for
    from twinflow.serve.engine import Item, run_items

    models, enc = served
    m = models["tiny"]
    assert m.export.method == "flow_matching"
    settings = settings_for("flow_matching", nfe, guidance=guidance or 0.0)
    assert settings.style == "mul" and settings.rho == 0.0
    prompts, counts, seeds = (
        ["a photo of a bag", "a photo of a dress", "a photo of a bag"],
        [2, 1, 3],
        [5, 6, 7],
    )
    items = [Item("tiny", p, nfe, s, n, guidance) for p, n, s in zip(prompts, counts, seeds)]
    batched = run_items(models, enc, items)
    null = enc.get(TEXT_LEN).null_condition()
    shape = tuple(m.generator.sample_shape)
    for prompt, n, seed, res in zip(prompts, counts, seeds, batched):
        alone = sample(
            m.model_fn(False),
            seeded_noise(n, shape, seed),
            _cond(enc, [prompt], [n]),
            settings=settings,
            generator=renoise_generator(seed),
            null_cond=null if guidance else None,
        )
        assert res.pngs == png_bytes(alone), (prompt, seed)
    # the few-step preset gives other images: the test tells the two samplers apart
    few = sample(
        m.model_fn(False),
        seeded_noise(2, shape, 5),
        _cond(enc, prompts[:1], [2]),
        settings=settings_for("twinflow", nfe),
        generator=renoise_generator(5),
    )
    assert png_bytes(few) != batched[0].pngs


def test_image_never_depends_on_batch_mates(served):
    from twinflow.serve.engine import Item, run_items

    models, enc = served
    target = Item("tiny", "a photo of a sneaker", nfe=2, seed=123, num_images=2)
    alone = run_items(models, enc, [target])[0]
    mates = [
        Item("tiny", "a photo of a coat", 2, 1, 3),
        target,
        Item("tiny", "a photo of a bag", 2, 9, 1),
        Item("tiny", "a photo of a bag", 1, 4, 2),
        Item("tiny-edit", "a photo of a sneaker", 2, 123, 2),
    ]
    together = run_items(models, enc, mates)
    assert together[1].pngs == alone.pngs
    assert together[1].batch_requests == 5 and together[1].group_requests == 3
    # another seed, another model or another NFE changes the image
    assert together[4].pngs != alone.pngs
    assert run_items(models, enc, [Item("tiny", "a photo of a sneaker", 2, 124, 2)])[0].pngs != alone.pngs
    assert run_items(models, enc, [Item("tiny", "a photo of a sneaker", 4, 123, 2)])[0].pngs != alone.pngs
    img = Image.open(io.BytesIO(alone.pngs[0]))
    assert img.size == (28, 28) and img.mode == "L"


def test_run_items_accounts_its_phases(served):
    from twinflow.serve.engine import Item, run_items

    models, enc = served
    phases: dict[str, float] = {}
    run_items(
        models, enc, [Item("tiny", "a photo of a bag", 1, 1), Item("tiny", "a photo of a bag", 2, 2)], phases
    )
    assert set(phases) == {"assembly", "model", "encoding"} and all(v > 0 for v in phases.values())
    once = dict(phases)
    run_items(models, enc, [Item("tiny", "a photo of a bag", 1, 1)], phases)  # sums across calls
    assert all(phases[k] > once[k] for k in once)


def test_row_stable_padding_sizes(served):
    models, _ = served
    fn = models["tiny"].model_fn(False)
    assert fn.sizes[-1] == 16 and fn.sizes == sorted(fn.sizes)
    assert all(fn.padded_size(n) >= n and fn.padded_size(n) in fn.sizes for n in range(1, 17))


def test_edit_rows_use_the_reference_image(served):
    from twinflow.serve.engine import Item, run_items

    models, enc = served
    a = np.zeros((28, 28, 1), np.uint8)
    b = np.full((28, 28, 1), 255, np.uint8)
    ra = run_items(models, enc, [Item("tiny-edit", "flip it", 1, 3, 1, image=a)])[0]
    rb = run_items(models, enc, [Item("tiny-edit", "flip it", 1, 3, 1, image=b)])[0]
    ra2 = run_items(
        models,
        enc,
        [Item("tiny-edit", "flip it", 1, 8, 1, image=b), Item("tiny-edit", "flip it", 1, 3, 1, image=a)],
    )[1]
    assert ra.pngs != rb.pngs and ra2.pngs == ra.pngs


def test_text_embeddings_are_cached(served):
    from twinflow.serve.engine import TextEncoders

    enc = TextEncoders(cache_size=8)
    enc.encode(["a photo of a dress", "a photo of a bag"], TEXT_LEN)
    before = enc.cache_info()
    out = enc.encode(["a photo of a dress", "a photo of a dress"], TEXT_LEN)
    after = enc.cache_info()
    assert after["hits"] - before["hits"] == 2 and after["misses"] == before["misses"] == 2
    assert out["text_states"].shape == (2, TEXT_LEN, 384) and torch.equal(
        out["text_states"][0], out["text_states"][1]
    )


def _png(size=(28, 28), mode="L") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_to_model_geometry():
    from twinflow.serve.engine import image_to_model

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    assert image_to_model(img, 1, 28).shape == (28, 28, 1)
    assert image_to_model(img, 3, 32).shape == (32, 32, 3) and image_to_model(img, 3, 32).dtype == np.uint8


def _noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def test_image_to_model_keeps_an_upload_at_the_model_size_pixel_for_pixel():
    from twinflow.serve.engine import image_to_model

    gray = _noise("L", (28, 28))
    assert np.array_equal(image_to_model(gray, 1, 28), np.asarray(gray)[..., None])
    rgb = _noise("RGB", (32, 32), seed=1)
    assert np.array_equal(image_to_model(rgb, 3, 32), np.asarray(rgb))


def test_image_to_model_converts_channels_by_luma_and_drops_alpha():
    from twinflow.serve.engine import image_to_model

    # ITU-R 601 luma, Pillow's rounding: 0.299 * 10 + 0.587 * 200 + 0.114 * 30 = 123.81
    assert (image_to_model(Image.new("RGB", (28, 28), (10, 200, 30)), 1, 28) == 124).all()
    assert (image_to_model(Image.new("L", (28, 28), 77), 3, 28) == 77).all()  # gray into all three
    rgba = image_to_model(Image.new("RGBA", (28, 28), (10, 200, 30, 0)), 3, 28)
    assert rgba.shape == (28, 28, 3) and (rgba == np.array([10, 200, 30], np.uint8)).all()
    palette = Image.new("P", (28, 28), 1)
    palette.putpalette([0, 0, 0, 250, 5, 40] + [0] * 762)
    assert (image_to_model(palette, 3, 28) == np.array([250, 5, 40], np.uint8)).all()


def test_image_to_model_stretches_with_pillows_bicubic():
    from twinflow.serve.engine import image_to_model

    # a 40x30 upload whose left quarter is dark: stretched to the square, not cropped or padded
    quarter = np.full((30, 40), 200, np.uint8)
    quarter[:, :10] = 0
    out = image_to_model(Image.fromarray(quarter), 1, 28)[..., 0]
    assert (out[:, :6] < 10).all() and (out[:, 8:] > 190).all()
    # one side already right is not enough
    assert image_to_model(Image.new("L", (28, 30)), 1, 28).shape == (28, 28, 1)
    assert image_to_model(Image.new("L", (30, 28)), 1, 28).shape == (28, 28, 1)
    # bicubic: it overshoots at an edge, where nearest, bilinear and box stay inside the input's range
    edge = np.full((8, 8), 64, np.uint8)
    edge[:, 4:] = 192
    up = image_to_model(Image.fromarray(edge), 1, 28)[..., 0]
    assert up.min() < 64 and up.max() > 192
    want = Image.fromarray(edge).resize((28, 28), Image.Resampling.BICUBIC)
    assert np.array_equal(up, np.asarray(want))
    # a palette PNG is converted before it is resized: bicubic on its colours, not nearest on its indices
    palette = Image.fromarray(edge).convert("P")
    assert np.array_equal(image_to_model(palette, 3, 28), image_to_model(palette.convert("RGB"), 3, 28))


def test_schemas_are_strict_and_limits_named():
    from pydantic import ValidationError

    from twinflow.serve.config import Limits
    from twinflow.serve.schemas import ApiError, GenerateRequest, check_limits

    req = GenerateRequest.model_validate({"prompt": "x", "nfe": 2, "guidance": 1})
    assert req.format == "base64-json" and req.guidance == 1.0
    for bad in (
        {"prompt": "x", "colour": "red"},
        {"prompt": "x", "nfe": "2"},
        {"prompt": 3},
        {"prompt": "x", "nfe": 1.5},
        {"prompt": "x", "seed": -1},
        {"nfe": 1},
        {"prompt": "x", "format": "jpg"},
    ):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(bad)
    limits = Limits(max_nfe=8, max_images=4, max_prompt_chars=10)
    check_limits(GenerateRequest(prompt="short", nfe=8, num_images=4), "short", limits)
    with pytest.raises(ApiError) as e:
        check_limits(
            GenerateRequest(prompt="far too long", nfe=9, num_images=5, format="png"), "far too long", limits
        )
    assert e.value.status == 422
    assert {d["loc"][0] for d in e.value.details} == {"nfe", "num_images", "prompt", "format"}


def test_app_config_errors(tmp_path):
    from pydantic import ValidationError

    from twinflow.serve.config import parse_args

    with pytest.raises(ValidationError, match="duplicate"):
        parse_args({"models": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]})
    with pytest.raises(ValidationError, match="default_model"):
        parse_args({"models": [{"id": "a", "path": "x"}], "default_model": "b"})
    with pytest.raises(ValidationError, match="model id"):
        parse_args({"models": [{"id": "a b", "path": "x"}]})
    with pytest.raises(ValidationError, match="extra"):
        parse_args({"models": [{"id": "a", "path": "x"}], "batchin": {}})
    cfg = parse_args({"models": [{"id": "a", "path": "rel/dir"}, {"id": "b", "path": "s3://bucket/e"}]})
    res = cfg.resolved(tmp_path)
    assert res.models[0].path == str(tmp_path / "rel" / "dir") and res.models[1].path == "s3://bucket/e"
    assert res.default_id == "a"
