"""The one Fréchet distance: between Gaussians fitted to two sets of features.

Its own module because both feature spaces use it: the judges' (`metrics`) and the autoencoder's
(`autoencoder_space`, whose held-out figures are FDs), and `metrics` imports the autoencoder space.
"""

from __future__ import annotations

import torch
from torch import Tensor


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric PSD matrix, through
    eigendecompositions in float64: no complex parts, no sqrtm iterations."""
    mu1, mu2, s1, s2 = (torch.as_tensor(a).double() for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}"
        )
    r1 = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return float(fd.clamp_min(0))


def frechet_distance_features(a: Tensor, b: Tensor) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))
