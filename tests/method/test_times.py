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
