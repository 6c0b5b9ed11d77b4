"""The OpenAI Images API routes, driven by the official `openai` client, unmodified, pointed at the
session's Serve app (tests/serve/conftest.py: `/` without auth, `/secure` with a bearer token)."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from twinflow.serve.openai_api import openai_error
from twinflow.serve.schemas import ApiError

TOKEN = "s3cret-token"


def client(base: str, prefix: str = "", token: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}{prefix}/v1", api_key=token, max_retries=0, timeout=120)


def png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# ------------------------------------------------------------------------------------- unit (fast)
def test_limit_errors_become_400_naming_the_openai_parameter():
    exc = ApiError(422, "invalid_request", "out of bounds", [{"loc": ["num_images"], "msg": "must be <= 4"}])
    r = openai_error(exc)
    assert r.status_code == 400
    import json

    err = json.loads(r.body)["error"]
    assert err["param"] == "n" and err["type"] == "invalid_request_error" and "must be <= 4" in err["message"]
    r = openai_error(ApiError(401, "unauthorized", "wrong token", headers={"WWW-Authenticate": "Bearer"}))
    assert r.status_code == 401 and json.loads(r.body)["error"]["code"] == "invalid_api_key"


# ----------------------------------------------------------------------------------- integration
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_openai_client_generates_the_same_images_as_v1_generate(serve_app):
    c = client(serve_app, "/secure", TOKEN)
    out = c.images.generate(
        model="tiny",
        prompt="a photo of a sneaker",
        n=2,
        size="auto",
        response_format="b64_json",
        extra_body={"nfe": 2, "seed": 11, "guidance": 0.5},
    )
    assert out.created > 0 and len(out.data) == 2 and out.output_format == "png"
    images = [decoded(d.b64_json) for d in out.data]
    assert images[0].shape[:2] == (28, 28) and not np.array_equal(images[0], images[1])
    ours = requests.post(
        f"{serve_app}/secure/v1/generate",
        json={
            "prompt": "a photo of a sneaker",
            "model": "tiny",
            "num_images": 2,
            "nfe": 2,
            "seed": 11,
            "guidance": 0.5,
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    ).json()
    assert [d.b64_json for d in out.data] == [i["data"] for i in ours["images"]]
    # its own size is accepted by name; the default model answers when none is named
    again = c.images.generate(
        prompt="a photo of a sneaker", size="28x28", extra_body={"nfe": 2, "seed": 11, "guidance": 0.5}
    )
    assert again.data[0].b64_json == out.data[0].b64_json


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_openai_client_edits_an_uploaded_image(serve_app):
    c = client(serve_app)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    png = png_of(digit)
    out = c.images.edit(
        image=("digit.png", png, "image/png"),
        prompt="flip the digit horizontally",
        model="tiny-edit",
        n=2,
        extra_body={"nfe": 1, "seed": 5},
    )
    assert len(out.data) == 2 and decoded(out.data[0].b64_json).shape[:2] == (28, 28)
    ours = requests.post(
        f"{serve_app}/v1/edit",
        files={"image": ("digit.png", png, "image/png")},
        data={
            "instruction": "flip the digit horizontally",
            "model": "tiny-edit",
            "num_images": "2",
            "nfe": "1",
            "seed": "5",
        },
        timeout=120,
    ).json()
    assert [d.b64_json for d in out.data] == [i["data"] for i in ours["images"]]
    # a model that cannot edit says so in the client's usual exception
    with pytest.raises(openai.APIStatusError) as err:
        c.images.edit(image=("digit.png", png, "image/png"), prompt="invert", model="tiny")
    assert err.value.status_code == 501 and "does not support editing" in err.value.message


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_openai_client_gets_its_usual_exceptions(serve_app):
    with pytest.raises(openai.AuthenticationError) as err:
        client(serve_app, "/secure", "wrong-token").images.generate(prompt="a bag", model="tiny")
    assert err.value.body["code"] == "invalid_api_key"
    c = client(serve_app)
    with pytest.raises(openai.NotFoundError) as err:
        c.images.generate(prompt="a bag", model="dall-e-3")
    assert err.value.body["code"] == "model_not_found" and "dall-e-3" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # more images than the deployment's max_images (4)
        c.images.generate(prompt="a bag", model="tiny", n=5)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        c.images.generate(prompt="a bag", model="tiny", size="1024x1024")
    assert err.value.body["param"] == "size" and "28x28" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.images.generate(prompt="a bag", model="tiny", response_format="url")
    assert err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:  # an extra field of the wrong type
        c.images.generate(prompt="a bag", model="tiny", extra_body={"nfe": "two"})
    assert err.value.body["param"] == "nfe"
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # > 64 KiB as PNG
    with pytest.raises(openai.APIStatusError) as err:
        c.images.edit(image=("big.png", png_of(big), "image/png"), prompt="invert", model="tiny-edit")
    assert err.value.status_code == 413
