"""The metric maths: Fréchet distance, diversity/collapse, adherence, PSNR; no Ray, no generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinflow.eval.frechet import feature_stats, frechet_distance, frechet_distance_features
from twinflow.eval.metrics import (
    adherence,
    diversity,
    mean_pairwise_distance,
    metrics_from_samples,
    mse_psnr,
    per_class_spread,
)


def test_fd_of_identical_sets_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # a rank-deficient covariance (fewer rows than dims) still gives ~0, not NaN
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    assert frechet_distance_features(g, g) == pytest.approx(0.0, abs=1e-6)


def test_fd_closed_form_non_commuting_2x2():
    # For 2x2 PSD A: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)); with A = S1^1/2 S2 S1^1/2,
    # tr A = tr(S1 S2) and det A = det S1 det S2.
    f64 = torch.float64
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([2.0, -1.0], dtype=f64)
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=f64)
    s2 = torch.tensor([[1.0, -0.5], [-0.5, 3.0]], dtype=f64)
    cross = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    expected = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_fd_of_sampled_isotropic_gaussians():
    # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (2 - 1)^2
    d, n = 8, 20000
    g = torch.Generator().manual_seed(0)
    m = torch.full((d,), 0.5)
    a = torch.randn(n, d, generator=g)
    b = m + 2 * torch.randn(n, d, generator=g)
    expected = float(m.pow(2).sum()) + d
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=0.03)


def test_fd_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))


def test_diversity_flags_a_collapsed_set():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=g)
    labels = torch.arange(400) % 4
    spread = per_class_spread(real, labels)
    fresh = torch.randn(400, 16, generator=g)
    ok = diversity(fresh, labels, spread)
    assert ok["diversity"] == pytest.approx(1.0, abs=0.05) and ok["collapse"] == 0.0
    # class 0 collapsed to (almost) one point, the others fine: flagged, and the mean drops
    collapsed = fresh.clone()
    collapsed[labels == 0] = fresh[0] + 1e-3 * torch.randn(100, 16, generator=g)
    bad = diversity(collapsed, labels, spread)
    assert bad["collapse"] == 0.25
    assert bad["per_class"][0] < 0.01 and bad["diversity"] < 0.8
    assert mean_pairwise_distance(torch.zeros(5, 3)) == 0.0


def test_adherence_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert adherence(logits, [0, 1, 1, 1]) == 0.75
    with pytest.raises(ValueError):
        adherence(logits, [0, 1])


def test_psnr_maths():
    x = torch.zeros(3, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) = 26.0206 dB
    y[1, :, :2] = 1.0  # half the pixels off by 1: MSE 0.5 -> 10 log10(8) = 9.0309 dB
    mse, psnr = mse_psnr(y, x)
    assert mse[:2].tolist() == pytest.approx([0.01, 0.5])
    assert psnr[:2].tolist() == pytest.approx([10 * math.log10(400), 10 * math.log10(8)])
    assert math.isinf(float(psnr[2]))  # identical images
    assert float(mse_psnr(y, x, data_range=1.0)[1][0]) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        mse_psnr(x, x[:, :, :2])


def test_real_heldout_images_score_like_the_judge(mnist_judge, mnist_reference):
    """Adherence of real held-out images equals the judge's accuracy; their FD to the reference is 0
    (they are the reference) and their diversity 1; a train sample of the same size lands near 0."""
    from twinflow.eval.datasets import load_split

    held = load_split("mnist", "heldout")
    x = held.as_float()
    m = metrics_from_samples(x, held.labels, mnist_judge, mnist_reference)
    assert m["adherence"] == pytest.approx(mnist_judge.accuracy(x, held.labels), abs=1e-9)
    assert m["fd"] == pytest.approx(0.0, abs=1e-6)
    assert m["diversity"] == pytest.approx(1.0, abs=1e-9) and m["collapse"] == 0.0
    floor = mnist_reference.floor(held.labels.tolist())
    assert (
        0
        < floor["fd"]
        < 0.1
        * metrics_from_samples(
            torch.zeros_like(x[:200]) - 1 + 0.01 * torch.randn_like(x[:200]),
            held.labels[:200],
            mnist_judge,
            mnist_reference,
        )["fd"]
    )
    # mode collapse of real data (each class one image repeated) is flagged
    first = {c: int(np.flatnonzero(held.labels == c)[0]) for c in range(10)}
    rep = x[[first[int(c)] for c in held.labels]]
    collapsed = metrics_from_samples(rep, held.labels, mnist_judge, mnist_reference)
    assert collapsed["collapse"] == 1.0 and collapsed["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["fd"] > 10 * floor["fd"]


def test_saturation_counts_pixels_above_the_level():
    from twinflow.eval.metrics import saturation

    images = torch.tensor([[[[0.95, 0.5], [-1.0, 1.0]]]])
    assert saturation(images) == pytest.approx(0.5)
    assert saturation(-images) == pytest.approx(0.25) and saturation(images * 0) == 0.0
