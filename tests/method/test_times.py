import torch

from twinflow.method.groups import split_groups
from twinflow.method.times import sample_times


def test_times_per_group():
    split = split_groups(400, lambda_=0.5)
    t, r = sample_times(split, generator=torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (400,) and t.dtype == torch.float32
    e, m, a, v = (split.slice(k) for k in ("e2e", "mul", "any", "adv"))
    assert torch.all(t[e] == 1) and torch.all(r[e] == 0)
    assert torch.all((t[m] >= 0) & (t[m] <= 1))
    gap = t[m] - r[m]
    assert torch.all(gap >= 0) and torch.all(gap <= 0.05 * t[m] + 1e-7)
    assert gap.max() > 0.03 * t[m].max() * 0.5  # the gap is really drawn, not zero
    assert torch.all((r[a] >= 0) & (r[a] <= t[a]))
    assert (r[a] / t[a]).std() > 0.2  # spread over (0, t), roughly uniform (std of U is 0.29)
    assert torch.all(t[v] < 0) and torch.all(t[v] == r[v]) and torch.all(t[v] >= -1)


def test_times_are_reproducible_from_the_generator():
    split = split_groups(16, lambda_=0.5)
    a = sample_times(split, generator=torch.Generator().manual_seed(3))
    b = sample_times(split, generator=torch.Generator().manual_seed(3))
    c = sample_times(split, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _ks_to_uniform(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample's empirical CDF and U(0, 1)'s."""
    x = x.double().sort().values
    n = x.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - x
    below = x - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def test_times_follow_their_distributions():
    """Each drawn quantity is U(0, 1) once rescaled: t for MUL/ANY, -t for ADV, the MUL gap over its
    0.05 t bound, and r / t for ANY. Ranges alone pass on t ~ U^2, which piles up near 0."""
    split = split_groups(40_000, lambda_=0.5)
    t, r = sample_times(split, generator=torch.Generator().manual_seed(0))
    m, a, v = (split.slice(k) for k in ("mul", "any", "adv"))
    draws = {
        "mul t": t[m],
        "mul gap / (0.05 t)": (t[m] - r[m]) / (0.05 * t[m]),
        "any t": t[a],
        "any r / t": r[a] / t[a],
        "adv -t": -t[v],
    }
    for name, x in draws.items():
        n = x.numel()
        assert n > 3_000, name
        # KS critical value at p = 1e-6: sqrt(ln(2 / p) / (2 n)); about 0.035 at n = 10k.
        bound = (torch.log(torch.tensor(2 / 1e-6)) / (2 * n)).sqrt().item()
        assert _ks_to_uniform(x) < bound, f"{name} is not U(0, 1)"
        quartiles = torch.quantile(x.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        assert torch.allclose(quartiles, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), atol=0.02), (
            name
        )
