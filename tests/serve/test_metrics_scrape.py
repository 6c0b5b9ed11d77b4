"""The app's Prometheus metrics, scraped for real from the session Ray node's metrics endpoint (the
port Ray's metrics agent exports on), after requests with an NFE no other test uses."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NFE = "3"


def scrape(port: int) -> dict[str, list]:
    """metric sample name -> [(labels, value)] of the twinflow metrics on the node's endpoint."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_twinflow_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict[str, list], name: str, **labels) -> float:
    """Sum over replicas (WorkerId) of the samples whose labels include `labels`."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def test_scrape_shows_request_counts_errors_latencies_and_batches(serve_app, ray_cluster):
    port = int(ray_cluster.nodes()[0]["MetricsExportPort"])
    before = scrape(port)
    ok = dict(route="/v1/generate", model="tiny", nfe=NFE)
    for seed in range(3):
        r = requests.post(
            f"{serve_app}/v1/generate",
            json={"prompt": "a photo of a bag", "model": "tiny", "nfe": 3, "seed": seed, "num_images": 2},
            timeout=120,
        )
        assert r.status_code == 200
    r = requests.post(
        f"{serve_app}/v1/images/generations",
        json={"prompt": "a photo of a bag", "model": "tiny", "nfe": 3, "seed": 0},
        timeout=120,
    )
    assert r.status_code == 200
    bad = requests.post(
        f"{serve_app}/v1/generate", json={"prompt": "a bag", "model": "tiny", "nfe": 99}, timeout=60
    )
    assert bad.status_code == 422

    want = {
        ("ray_twinflow_requests_total", (("status", "200"), *ok.items())): 3,
        (
            "ray_twinflow_requests_total",
            (("route", "/v1/images/generations"), ("status", "200"), ("nfe", NFE)),
        ): 1,
        ("ray_twinflow_requests_total", (("route", "/v1/generate"), ("status", "422"), ("nfe", "99"))): 1,
        ("ray_twinflow_request_latency_ms_count", tuple(ok.items())): 3,
        ("ray_twinflow_queue_wait_ms_count", (("model", "tiny"), ("nfe", NFE))): 4,
        ("ray_twinflow_model_ms_count", (("model", "tiny"), ("nfe", NFE))): 4,
        ("ray_twinflow_encoding_ms_count", (("model", "tiny"), ("nfe", NFE))): 4,
        # one compute turn per request (they were sent one after another), each with its images
        ("ray_twinflow_batch_requests_count", (("model", "tiny"), ("nfe", NFE))): 4,
        ("ray_twinflow_batch_images_count", (("model", "tiny"), ("nfe", NFE))): 4,
    }
    deadline = time.time() + 120  # Ray's metrics agent exports every few seconds
    while True:
        after = scrape(port)
        got = {k: total(after, k[0], **dict(k[1])) - total(before, k[0], **dict(k[1])) for k in want}
        if got == want or time.time() > deadline:
            break
        time.sleep(3)
    assert got == want
    # histograms: a bucket per boundary, and the model time of a sampled request is positive
    buckets = [lab for lab, _ in after["ray_twinflow_model_ms_bucket"] if lab.get("nfe") == NFE]
    assert {b["le"] for b in buckets} >= {"10.0", "1000.0", "+Inf"}
    assert total(after, "ray_twinflow_model_ms_sum", nfe=NFE) > total(
        before, "ray_twinflow_model_ms_sum", nfe=NFE
    )
