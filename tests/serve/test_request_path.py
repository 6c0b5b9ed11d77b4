"""One request path for our routes and the OpenAI-style ones, on a replica object without Ray: the same
request queues the same item and answers the same images, and every check runs in the same order."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from .replica import call, form, make_replica, post_json


@pytest.fixture
def rep():
    return make_replica()


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


DIGIT = np.zeros((20, 24), np.uint8)  # not the model's 28x28: the upload is resized on the way
DIGIT[4:16, 10:14] = 255
QUEUED = ("model_id", "prompt", "nfe", "seed", "num_images", "guidance", "weight")


def _queued(item) -> dict:
    return {k: getattr(item, k) for k in QUEUED}


def _native_images(r) -> list[str]:
    return [i["data"] for i in json.loads(r.body)["images"]]


def _openai_images(r) -> list[str]:
    return [d["b64_json"] for d in json.loads(r.body)["data"]]


def test_openai_generation_queues_and_answers_what_v1_generate_does(rep):
    ours = post_json(
        rep,
        "/v1/generate",
        {"prompt": "a bag", "model": "tiny", "nfe": 2, "seed": 9, "num_images": 3, "guidance": 0.5},
    )
    theirs = post_json(
        rep,
        "/v1/images/generations",
        {"prompt": "a bag", "model": "tiny", "nfe": 2, "seed": 9, "n": 3, "guidance": 0.5, "size": "28x28"},
    )
    assert ours.status_code == theirs.status_code == 200
    a, b = rep.queued
    assert _queued(a) == _queued(b) and a.image is None and b.image is None
    assert _native_images(ours) == _openai_images(theirs) and len(_openai_images(theirs)) == 3
    body = json.loads(ours.body)
    for h, key in (("X-TwinFlow-Model", "model"), ("X-TwinFlow-Seed", "seed"), ("X-TwinFlow-NFE", "nfe")):
        assert theirs.headers[h] == str(body[key])
    assert rep.phases.requests == 2


def test_openai_edit_queues_and_answers_what_v1_edit_does(rep):
    png = _png(DIGIT)
    fields = {"model": "tiny-edit", "nfe": "2", "seed": "4"}
    ours_json = post_json(
        rep,
        "/v1/edit",
        {
            "image": base64.b64encode(png).decode(),
            "instruction": "flip",
            "model": "tiny-edit",
            "nfe": 2,
            "seed": 4,
            "num_images": 2,
        },
    )
    ours_form = call(
        rep,
        "/v1/edit",
        *form({**fields, "instruction": "flip", "num_images": "2"}, {"image": ("d.png", png)}),
    )
    theirs = call(
        rep, "/v1/images/edits", *form({**fields, "prompt": "flip", "n": "2"}, {"image[]": ("d.png", png)})
    )
    assert [r.status_code for r in (ours_json, ours_form, theirs)] == [200, 200, 200]
    items = rep.queued
    assert len(items) == 3 and all(_queued(it) == _queued(items[0]) for it in items)
    assert items[0].image.shape == (28, 28, 1)
    assert all(np.array_equal(it.image, items[0].image) for it in items)
    assert _native_images(ours_json) == _native_images(ours_form) == _openai_images(theirs)


# (our route, its body, the OpenAI route, its body) failing two checks at once: the first check wins on both
GIF = _png(DIGIT, "GIF")
ORDER = [
    # Content-Type before the body is read
    ("/v1/generate", (b"{", "text/plain"), "/v1/images/generations", (b"{", "text/plain"), 415),
    # the model before the limits (and, on the OpenAI routes, before size and response_format)
    (
        "/v1/generate",
        {"prompt": "a", "model": "nope", "nfe": 99},
        "/v1/images/generations",
        {"prompt": "a", "model": "nope", "nfe": 99, "size": "5x5", "response_format": "url"},
        404,
    ),
    # the limits before the upload is decoded
    (
        "/v1/edit",
        ({"instruction": "a", "model": "tiny-edit", "nfe": "99"}, {"image": ("g.gif", GIF)}),
        "/v1/images/edits",
        ({"prompt": "a", "model": "tiny-edit", "nfe": "99"}, {"image": ("g.gif", GIF)}),
        422,
    ),
    # the upload's format before whether the model can edit
    (
        "/v1/edit",
        ({"instruction": "a", "model": "tiny"}, {"image": ("g.gif", GIF)}),
        "/v1/images/edits",
        ({"prompt": "a", "model": "tiny"}, {"image": ("g.gif", GIF)}),
        400,
    ),
    (
        "/v1/edit",
        ({"instruction": "a", "model": "tiny"}, {"image": ("d.png", _png(DIGIT))}),
        "/v1/images/edits",
        ({"prompt": "a", "model": "tiny"}, {"image": ("d.png", _png(DIGIT))}),
        501,
    ),
]


def _send(rep, path, body):
    if isinstance(body, dict):
        return post_json(rep, path, body)
    if isinstance(body[0], bytes):
        return call(rep, path, *body)
    return call(rep, path, *form(*body))


@pytest.mark.parametrize("ours,our_body,theirs,their_body,status", ORDER)
def test_both_routes_check_in_the_same_order(rep, ours, our_body, theirs, their_body, status):
    a, b = _send(rep, ours, our_body), _send(rep, theirs, their_body)
    mine, openai = json.loads(a.body)["error"], json.loads(b.body)["error"]
    assert a.status_code == status and b.status_code == (400 if status == 422 else status)
    assert openai["message"].startswith(mine["message"])  # OpenAI's adds the parameter after a colon
    assert rep.queued == []


def test_the_token_is_checked_after_the_content_type_and_before_the_body():
    rep = make_replica(token="tok")
    for path in ("/v1/generate", "/v1/images/generations"):
        assert call(rep, path, b"{", "text/plain").status_code == 415
        assert call(rep, path, b"{", "application/json").status_code == 401
        ok = post_json(rep, path, {"prompt": "a", "seed": 1}, {"authorization": "Bearer tok"})
        assert ok.status_code == 200
    assert len(rep.queued) == 2
