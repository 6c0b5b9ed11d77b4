import torch

from twinflow.method.targets import (
    cfg_mask,
    enhance_velocity,
    rcgm_residual,
    rcgm_target,
    rollout_times,
    teacher_rollout,
)

from .analytic import DiracFlow


def _dirac_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_star = torch.tensor([0.5, -1.0])
    eps = torch.randn(n, 2, generator=g)
    t = 0.05 + 0.95 * torch.rand(n, generator=g)
    r = t * torch.rand(n, generator=g) * 0.9  # t - r >= 0.1 t >= 0.005 ... filtered below
    keep = (t - r) >= 0.02
    t, r, eps = t[keep], r[keep], eps[keep]
    x_t = (1 - t)[:, None] * x_star + t[:, None] * eps
    return DiracFlow(x_star), x_t, eps - x_star, t, r


def test_exact_model_is_a_fixed_point():
    """With the exact average velocity (single-point data), R = 0 and T = G for any rollout order."""
    model, x_t, v, t, r = _dirac_batch(256)
    G = model(x_t, t, r, {})
    assert torch.allclose(G, v, atol=1e-5)  # straight paths: average velocity = eps - x*
    for order in (1, 2, 3):
        T = rcgm_target(G, x_t, v, t, r, {}, model, delta=0.01, order=order)
        assert torch.allclose(T, G, atol=2e-4), order


def test_residual_sign_pushes_an_overshoot_back():
    model, x_t, v, t, r = _dirac_batch(256, seed=1)
    G = model(x_t, t, r, {}) + 0.001
    T = rcgm_target(G, x_t, v, t, r, {}, model, delta=0.01, order=2)
    expected = G - ((t - r)[:, None] * 0.001 / 0.01).clamp(max=1.0)
    assert torch.allclose(T, expected, atol=2e-4)
    assert torch.all(T < G)
    # A large error is clipped to 1 per element.
    T_big = rcgm_target(G + 5.0, x_t, v, t, r, {}, model, delta=0.01, order=2)
    assert torch.allclose(T_big, G + 4.0, atol=1e-4)


def test_near_instantaneous_rows_are_flow_matching():
    g = torch.Generator().manual_seed(2)
    n = 64
    t = torch.rand(n, generator=g)
    r = t - 0.009 * torch.rand(n, generator=g) * (t > 0.01)  # t - r < delta
    x_t, v = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    G = v + 0.5 * torch.randn(n, 3, generator=g).clamp(-1, 1)
    T = rcgm_target(G, x_t, v, t, r, {}, lambda *a: torch.randn(n, 3), delta=0.01, order=2)
    assert torch.allclose(T, v, atol=1e-6)  # G - clip(G - v) = v when |G - v| <= 1
    G_far = v + 3.0
    T_far = rcgm_target(G_far, x_t, v, t, r, {}, lambda *a: torch.zeros(n, 3), delta=0.01, order=2)
    assert torch.allclose(T_far, G_far - 1.0)


def test_no_nan_at_t_equals_r_even_if_the_teacher_blows_up_there():
    x_star = torch.zeros(2)
    teacher = DiracFlow(x_star)  # divides by |t|: inf at t = 0
    t = torch.tensor([0.0, 0.3, 1.0, 0.004])
    r = torch.tensor([0.0, 0.3, 1.0, 0.0])
    x_t, v = torch.randn(4, 2), torch.randn(4, 2)
    G = v.clone()
    D = teacher_rollout(teacher, x_t, rollout_times(torch.maximum(t - 0.01, r), r, 2), {})
    R = rcgm_residual(G, v, D, t, r, 0.01)
    assert torch.isfinite(R).all()
    T = rcgm_target(G, x_t, v, t, r, {}, teacher, delta=0.01, order=2)
    assert torch.isfinite(T).all() and torch.allclose(T, v)


def test_rollout_times_are_equally_spaced():
    ts = rollout_times(torch.tensor([0.99, 0.5]), torch.tensor([0.0, 0.5]), 3)
    assert torch.allclose(torch.stack(ts), torch.tensor([[0.99, 0.5], [0.66, 0.5], [0.33, 0.5], [0.0, 0.5]]))


def test_cfg_enhancement_is_strictly_inside_the_interval():
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    assert cfg_mask(t, (0.0, 1.0)).tolist() == [False, True, True, True, False]
    assert cfg_mask(t, (0.2, 0.8)).tolist() == [False, False, True, False, False]
    v = torch.zeros(5, 2)
    pc, pn = torch.full((5, 2), 3.0), torch.full((5, 2), 1.0)
    out = enhance_velocity(v, t, pc, pn, 0.8, (0.0, 1.0))
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 1.6, 1.6, 1.6, 0.0]))
