import pytest
import torch

from twinflow.method.sampler import (
    SamplerSettings,
    preset,
    renoise_generator,
    sample,
    seeded_noise,
    settings_for,
    time_grid,
)

from .analytic import DiracFlow, LinearVelocity, Recorder


def test_reference_grids():
    assert torch.allclose(preset(1).grid(), torch.tensor([0.999, 0.0], dtype=torch.float64))
    assert torch.allclose(preset(2).grid(), torch.tensor([0.999, 0.6, 0.0], dtype=torch.float64))
    four = preset(4).grid()
    assert torch.allclose(four, torch.tensor([0.999, 0.833, 0.667, 0.5, 0.0], dtype=torch.float64), atol=1e-3)
    assert four[1].item() == pytest.approx(1 - (0.001 + 0.499 / 3))
    ode = preset("multistep")
    assert ode.nfe == 50 and ode.style == "mul" and ode.rho == 0.0
    assert torch.allclose(ode.grid(), torch.linspace(1, 0, 51, dtype=torch.float64))


def test_grid_gap_and_warp():
    assert torch.allclose(
        time_grid(4, g0=0.0, g1=0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    )
    warped = time_grid(3, g0=0.0, g1=0.0, warp=(2.0, 1.0, 1.0))
    u = torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64)
    assert torch.allclose(warped[:-1], 1 - u**2)
    with pytest.raises(ValueError, match="nfe must be"):
        time_grid(0)
    with pytest.raises(ValueError, match="g0 <= 1 - g1"):
        time_grid(2, g0=0.7, g1=0.5)


def test_one_nfe_is_a_single_jump_from_0999_to_0():
    rec = Recorder(LinearVelocity())
    x = torch.randn(5, 2)
    out = sample(rec, x, settings=preset(1))
    (call,) = rec.calls
    assert torch.all(call["t"] == 0.999) and torch.all(call["r"] == 0.0)
    expected = x - 0.999 * rec.inner(x, torch.full((5,), 0.999), torch.zeros(5), {})
    assert torch.allclose(out, expected.detach(), atol=1e-6)


def test_exact_model_samples_the_data_point_in_every_style():
    x_star = torch.tensor([0.3, -0.7])
    model = DiracFlow(x_star)
    noise = torch.randn(16, 2)
    for settings in (preset(1), preset(4), preset("multistep"), SamplerSettings(nfe=3, style="any", rho=0.5)):
        out = sample(model, noise, settings=settings, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, x_star.expand(16, 2), atol=1e-4), settings


def test_styles_pass_the_right_r():
    rec = Recorder(LinearVelocity())
    sample(rec, torch.randn(2, 2), settings=SamplerSettings(nfe=3, style="any", rho=0.0, g1=0.0, g0=0.0))
    ts = [c["t"][0].item() for c in rec.calls]
    rs = [c["r"][0].item() for c in rec.calls]
    assert ts == pytest.approx([1.0, 2 / 3, 1 / 3]) and rs == pytest.approx([2 / 3, 1 / 3, 0.0])
    rec.calls.clear()
    sample(rec, torch.randn(2, 2), settings=SamplerSettings(nfe=2, style="mul", rho=0.0))
    assert all(torch.equal(c["t"], c["r"]) for c in rec.calls)


def test_fresh_noise_is_seeded():
    model = LinearVelocity()
    noise = torch.randn(8, 2)
    a = sample(model, noise, settings=preset(4), generator=torch.Generator().manual_seed(1))
    b = sample(model, noise, settings=preset(4), generator=torch.Generator().manual_seed(1))
    c = sample(model, noise, settings=preset(4), generator=torch.Generator().manual_seed(2))
    d = sample(
        model, noise, settings=SamplerSettings(nfe=4, rho=0.0), generator=torch.Generator().manual_seed(2)
    )
    e = sample(
        model, noise, settings=SamplerSettings(nfe=4, rho=0.0), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.equal(d, e)


def test_guidance_is_one_batched_call():
    rec = Recorder(LinearVelocity(num_classes=3))
    x = torch.randn(4, 2)
    cond = {"label": torch.tensor([0, 1, 2, 0])}
    null = {"label": torch.tensor([3])}
    out = sample(rec, x, cond, settings=settings_for("twinflow", 1, guidance=2.0), null_cond=null)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 8
    t, r = torch.full((4,), 0.999), torch.zeros(4)
    f_c = rec.inner(x, t, r, cond)
    f_u = rec.inner(x, t, r, {"label": torch.full((4,), 3)})
    assert torch.allclose(out, (x - 0.999 * (f_c + 2.0 * (f_c - f_u))).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="null_cond"):
        sample(rec, x, cond, settings=settings_for("twinflow", 1, guidance=2.0))


def test_bad_settings():
    with pytest.raises(ValueError, match="style"):
        sample(LinearVelocity(), torch.randn(2, 2), settings=SamplerSettings(style="euler"))
    with pytest.raises(ValueError, match="preset"):
        preset(0)


def test_settings_for_picks_the_sampler_of_the_method():
    assert settings_for("twinflow", 2) == preset(2)
    assert settings_for(None, 4) == preset(4)
    fm = settings_for("flow_matching", 4, guidance=1.5)
    assert (fm.style, fm.rho, fm.g0, fm.g1, fm.guidance) == ("mul", 0.0, 0.0, 0.0, 1.5)
    assert torch.allclose(fm.grid(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert settings_for("flow_matching", "multistep") == preset("multistep")
    tuned = settings_for("twinflow", 2, "any", 0.5)
    assert (tuned.style, tuned.rho, tuned.g1) == ("any", 0.5, 0.6)


def test_row_groups_give_each_group_the_images_it_gets_alone():
    """Serve batches requests: group i's rows draw their fresh noise from their own generator."""
    model = LinearVelocity()
    sizes, seeds = [2, 1, 3], [5, 6, 7]
    noises = [seeded_noise(n, (2,), s) for n, s in zip(sizes, seeds)]
    together = sample(
        model,
        torch.cat(noises),
        settings=preset(4),
        row_groups=[(n, renoise_generator(s)) for n, s in zip(sizes, seeds)],
    )
    start = 0
    for n, s, noise in zip(sizes, seeds, noises):
        alone = sample(model, noise, settings=preset(4), generator=renoise_generator(s))
        assert torch.equal(together[start : start + n], alone)
        start += n
    with pytest.raises(ValueError, match="row_groups cover"):
        sample(model, torch.randn(4, 2), settings=preset(2), row_groups=[(3, renoise_generator(0))])
