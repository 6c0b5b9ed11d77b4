"""The Serve app on a real local Ray cluster, called over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration
TOKEN = {"Authorization": "Bearer s3cret-token"}


def post(base, path, body=None, *, data=None, headers=None, timeout=60):
    return requests.post(base + path, json=body, data=data, headers=headers, timeout=timeout)


def b64_png(size=(28, 28), mode="L", value=128, fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_health_and_models(serve_app):
    h = requests.get(serve_app + "/healthz", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == ["tiny", "tiny-edit"]
    body = requests.get(serve_app + "/v1/models", timeout=10).json()
    assert body["api_version"] == "v1"
    models = {m["id"]: m for m in body["models"]}
    assert set(models) == {"tiny", "tiny-edit"}
    tiny = models["tiny"]
    assert tiny["default"] and tiny["method"] == "flow_matching" and tiny["job"] == "serve-test"
    assert tiny["nfe"]["min"] == 1 and tiny["nfe"]["max"] == 8 and tiny["sample_shape"] == [1, 28, 28]
    assert tiny["tasks"] == ["generate"] and models["tiny-edit"]["tasks"] == ["generate", "edit"]
    assert tiny["text_max_length"] == 8 and body["limits"]["max_images"] == 4


def test_same_seed_same_image_over_http_and_in_process(serve_app, served):
    from twinflow.serve.engine import Item, run_items

    req = {"prompt": "a photo of a sneaker", "nfe": 2, "seed": 42, "format": "png"}
    a = post(serve_app, "/v1/generate", req)
    b = post(serve_app, "/v1/generate", req)
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    assert a.headers["x-twinflow-seed"] == "42" and a.headers["x-twinflow-model"] == "tiny"
    assert a.content == b.content
    j = post(serve_app, "/v1/generate", dict(req, format="base64-json", num_images=1)).json()
    assert base64.b64decode(j["images"][0]["data"]) == a.content
    assert j["seed"] == 42 and j["nfe"] == 2 and j["model"] == "tiny" and j["task"] == "generate"
    assert j["timings"]["total_ms"] >= j["timings"]["model_ms"] > 0
    # the replica's image is exactly what the engine gives in this process
    models, enc = served
    assert run_items(models, enc, [Item("tiny", "a photo of a sneaker", 2, 42, 1)])[0].pngs[0] == a.content
    other = post(serve_app, "/v1/generate", dict(req, seed=43)).content
    other_model = post(serve_app, "/v1/generate", dict(req, model="tiny-edit")).content
    assert other != a.content and other_model != a.content
    # no seed: a random one is chosen and returned, and replays exactly
    r = post(serve_app, "/v1/generate", {"prompt": "a photo of a bag", "num_images": 3}).json()
    assert len(r["images"]) == 3 and isinstance(r["seed"], int)
    again = post(
        serve_app, "/v1/generate", {"prompt": "a photo of a bag", "num_images": 3, "seed": r["seed"]}
    ).json()
    assert [i["data"] for i in again["images"]] == [i["data"] for i in r["images"]]
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]["data"]))))
    assert arr.shape == (28, 28) and arr.std() > 0


def test_concurrent_requests_are_batched_and_unchanged_by_it(serve_app):
    """12 simultaneous requests (NFE 1 and 2 mixed) share compute turns; every image equals the one
    the same request gets alone; /v1/stats accounts for their time by phase."""
    reqs = [
        {"prompt": f"a photo of a {w}", "seed": 100 + i, "nfe": 1 + i % 2, "num_images": 1 + i % 2}
        for i, w in enumerate(["dress", "bag", "coat", "shirt"] * 3)
    ]
    stats0 = requests.get(serve_app + "/v1/stats", timeout=10).json()
    before = stats0["batches"]
    barrier = threading.Barrier(len(reqs))
    out: list = [None] * len(reqs)

    def call(i):
        barrier.wait()
        out[i] = post(serve_app, "/v1/generate", reqs[i], timeout=120).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = [o["batch"]["requests"] for o in out]
    assert max(sizes) >= 2, sizes
    assert any(o["batch"]["group_requests"] < o["batch"]["requests"] for o in out) or max(sizes) < len(reqs)
    for o in out:  # a batch never holds more images than max_batch_images
        assert o["batch"]["images"] <= 16
    stats1 = requests.get(serve_app + "/v1/stats", timeout=10).json()
    after = stats1["batches"]
    p0, p1 = stats0["phases"], stats1["phases"]
    assert p1["requests"] - p0["requests"] == len(reqs) and p1["turns"] - p0["turns"] < len(reqs)
    assert all(p1["ms"][k] > p0["ms"][k] for k in ("parse", "queue_wait", "model", "encoding", "response"))
    multi = sum(v for k, v in after.items() if int(k) > 1) - sum(v for k, v in before.items() if int(k) > 1)
    assert multi >= 1, (before, after)
    for req, o in zip(reqs, out):  # alone, one at a time
        alone = post(serve_app, "/v1/generate", req).json()
        assert alone["batch"]["requests"] == 1
        assert [i["data"] for i in alone["images"]] == [i["data"] for i in o["images"]], req


def test_repeated_prompts_hit_the_text_cache(serve_app):
    info = lambda: requests.get(serve_app + "/v1/stats", timeout=10).json()["text_cache"]  # noqa: E731
    post(serve_app, "/v1/generate", {"prompt": "a photo of a cached sandal", "seed": 1})
    before = info()
    for s in range(3):
        assert (
            post(serve_app, "/v1/generate", {"prompt": "a photo of a cached sandal", "seed": s}).status_code
            == 200
        )
    after = info()
    assert after["hits"] - before["hits"] >= 3 and after["misses"] == before["misses"]


BIG = "x" * 101
BAD = [
    ("malformed json", "/v1/generate", None, b'{"prompt": "a", ', 400, "malformed_json"),
    ("not an object", "/v1/generate", None, b'["a photo"]', 400, "malformed_json"),
    ("not utf-8", "/v1/generate", None, b"\xff\xfe{", 400, "malformed_json"),
    ("unknown field", "/v1/generate", {"prompt": "a", "colour": "red"}, None, 422, "invalid_request"),
    ("wrong type", "/v1/generate", {"prompt": "a", "nfe": "2"}, None, 422, "invalid_request"),
    ("missing prompt", "/v1/generate", {"nfe": 1}, None, 422, "invalid_request"),
    ("nfe 0", "/v1/generate", {"prompt": "a", "nfe": 0}, None, 422, "invalid_request"),
    ("nfe too high", "/v1/generate", {"prompt": "a", "nfe": 9}, None, 422, "invalid_request"),
    ("too many images", "/v1/generate", {"prompt": "a", "num_images": 5}, None, 422, "invalid_request"),
    ("negative seed", "/v1/generate", {"prompt": "a", "seed": -3}, None, 422, "invalid_request"),
    ("prompt too long", "/v1/generate", {"prompt": BIG}, None, 422, "invalid_request"),
    (
        "png with 2 images",
        "/v1/generate",
        {"prompt": "a", "num_images": 2, "format": "png"},
        None,
        422,
        "invalid_request",
    ),
    ("unknown model", "/v1/generate", {"prompt": "a", "model": "nope"}, None, 404, "unknown_model"),
    (
        "edit: unknown field",
        "/v1/edit",
        {"image": "", "instruction": "a", "strength": 1},
        None,
        422,
        "invalid_request",
    ),
    ("edit: not base64", "/v1/edit", {"image": "@@@", "instruction": "a"}, None, 400, "bad_image"),
    (
        "edit: undecodable",
        "/v1/edit",
        {"image": base64.b64encode(b"\x89PNG garbage").decode(), "instruction": "a"},
        None,
        400,
        "bad_image",
    ),
    (
        "edit: image bytes",
        "/v1/edit",
        {"image": base64.b64encode(b"\0" * 70_000).decode(), "instruction": "a"},
        None,
        413,
        "image_too_large",
    ),
    (
        "edit: image side",
        "/v1/edit",
        {"image": b64_png((300, 8)), "instruction": "a"},
        None,
        413,
        "image_too_large",
    ),
    (
        "edit: image pixels (sides within bounds)",
        "/v1/edit",
        {"image": b64_png((250, 250)), "instruction": "a"},
        None,
        413,
        "image_too_large",
    ),
    (
        "edit: GIF is not an accepted format",
        "/v1/edit",
        {"image": b64_png(fmt="GIF"), "instruction": "a"},
        None,
        400,
        "bad_image",
    ),
    (
        "edit: body too large",
        "/v1/edit",
        {"image": "A" * 200_000, "instruction": "a"},
        None,
        413,
        "payload_too_large",
    ),
    (
        "edit: instruction too long",
        "/v1/edit",
        {"image": b64_png(), "instruction": BIG},
        None,
        422,
        "invalid_request",
    ),
    (
        "edit: model cannot edit",
        "/v1/edit",
        {"image": b64_png(), "instruction": "flip it"},
        None,
        501,
        "not_implemented",
    ),
]


def test_bad_input_gets_4xx_json_and_the_server_stays_up(serve_app):
    for name, path, body, raw, status, kind in BAD:
        headers = {"Content-Type": "application/json"} if raw is not None else None
        r = post(serve_app, path, body, data=raw, headers=headers)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["type"] == kind and err["message"], (name, err)
    r = requests.get(serve_app + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    details = post(serve_app, "/v1/generate", {"prompt": "a", "nfe": 9, "colour": 1}).json()["error"][
        "details"
    ]
    assert ["colour"] in [d["loc"] for d in details]
    mismatch = post(
        serve_app,
        "/v1/generate",
        {"prompt": "a", "model": "tiny"},
        headers={"serve_multiplexed_model_id": "tiny-edit"},
    )
    assert mismatch.status_code == 400 and mismatch.json()["error"]["type"] == "model_mismatch"
    assert requests.get(serve_app + "/healthz", timeout=10).status_code == 200
    assert post(serve_app, "/v1/generate", {"prompt": "still up", "seed": 1}).status_code == 200
    # the multiplexing header alone picks the model (and lets Serve route to a replica holding it)
    by_header = post(
        serve_app,
        "/v1/generate",
        {"prompt": "a", "seed": 1},
        headers={"serve_multiplexed_model_id": "tiny-edit"},
    )
    assert by_header.status_code == 200 and by_header.json()["model"] == "tiny-edit"


def test_edit_on_an_edit_capable_model(serve_app):
    dark = post(
        serve_app,
        "/v1/edit",
        {"model": "tiny-edit", "image": b64_png(value=0), "instruction": "invert it", "seed": 5},
    ).json()
    light = post(
        serve_app,
        "/v1/edit",
        {
            "model": "tiny-edit",
            "image": "data:image/png;base64," + b64_png(value=255),
            "instruction": "invert it",
            "seed": 5,
        },
    ).json()
    again = post(
        serve_app,
        "/v1/edit",
        {"model": "tiny-edit", "image": b64_png((64, 64), "RGB", 0), "instruction": "invert it", "seed": 5},
    ).json()
    assert dark["task"] == "edit" and len(dark["images"]) == 1
    assert dark["images"][0]["data"] != light["images"][0]["data"]
    assert again["images"][0]["data"] == dark["images"][0]["data"]  # resized/converted to the model's 28x28x1


def test_edit_as_multipart_form_equals_the_json_request(serve_app):
    """`curl -F image=@x.png -F instruction=... -F nfe=2`: the same image as the JSON body gives."""
    png = base64.b64decode(b64_png(value=200))
    form = {"model": "tiny-edit", "instruction": "invert it", "nfe": "2", "seed": "9"}
    r = requests.post(
        serve_app + "/v1/edit", data=form, files={"image": ("d.png", png, "image/png")}, timeout=60
    )
    assert r.status_code == 200, r.text[:300]
    body = {**form, "nfe": 2, "seed": 9, "image": base64.b64encode(png).decode()}
    assert r.json()["images"] == post(serve_app, "/v1/edit", body).json()["images"]
    assert r.json()["task"] == "edit" and r.json()["nfe"] == 2
    bad = [
        ({"instruction": "x"}, None, 422, "invalid_request"),  # no image part
        ({"instruction": "x", "nfe": "two"}, png, 422, "invalid_request"),
        ({"instruction": "x", "colour": "red"}, png, 422, "invalid_request"),
        ({"instruction": "x"}, base64.b64decode(b64_png((250, 250))), 413, "image_too_large"),
        ({"instruction": "x"}, b"GIF89a" + b"\0" * 30, 400, "bad_image"),
    ]
    for fields, image, status, kind in bad:
        files = (
            {"image": ("x", image, "application/octet-stream")} if image is not None else {"f": ("x", b"")}
        )
        r = requests.post(
            serve_app + "/v1/edit", data={"model": "tiny-edit", **fields}, files=files, timeout=60
        )
        assert r.status_code == status and r.json()["error"]["type"] == kind, (fields, r.text[:300])
    r = requests.post(
        serve_app + "/v1/edit", data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_form"


def test_bearer_token(serve_app):
    secure = serve_app + "/secure"
    assert requests.get(secure + "/healthz", timeout=10).status_code == 200
    r = requests.get(secure + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert (
        requests.get(secure + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
        == 401
    )
    assert (
        requests.get(secure + "/v1/models", headers={"Authorization": "s3cret-token"}, timeout=10).status_code
        == 401
    )
    assert post(secure, "/v1/generate", {"prompt": "a"}).status_code == 401
    ok = post(secure, "/v1/generate", {"prompt": "a", "seed": 1}, headers=TOKEN)
    assert ok.status_code == 200 and ok.json()["model"] == "tiny"
    assert requests.get(secure + "/v1/models", headers=TOKEN, timeout=10).json()["models"][0]["id"] == "tiny"
    # the open app has no token: same request, same image
    assert post(serve_app, "/v1/generate", {"prompt": "a", "seed": 1}).json()["images"] == ok.json()["images"]


def test_playground_page_is_served_with_its_base_path(serve_app):
    page = requests.get(serve_app + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'const BASE = "";' in page.text and "const AUTH = false;" in page.text
    sec = requests.get(serve_app + "/secure/", timeout=10).text
    assert 'const BASE = "/secure";' in sec and "const AUTH = true;" in sec
