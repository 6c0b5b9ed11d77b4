"""The velocity-model contract: shapes, conditioning forms, editing references, bad input."""

import pytest
import torch
from conftest import make_generator, random_cond


def test_contract_shapes(family):
    g = make_generator(family, "tiny-32rgb")
    assert g.sample_shape == (3, 32, 32)
    x = torch.randn(3, 3, 32, 32)
    out = g(x, torch.rand(3), torch.rand(3) * 0.1, random_cond(3))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_text_changes_output_and_null_condition_broadcasts(family):
    g = make_generator(family)
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 0.7)
    cond = random_cond(4, seed=1)
    null = {k: v[:1] for k, v in random_cond(1, seed=2).items()}
    with torch.no_grad():
        a, b = g(x, t, t, cond), g(x, t, t, null)
        expanded = g(x, t, t, {k: v.expand(4, *v.shape[1:]) for k, v in null.items()})
    assert (a - b).abs().mean() > 1e-4
    torch.testing.assert_close(b, expanded, atol=1e-6, rtol=1e-6)


def test_text_mask_hides_padding(family):
    g = make_generator(family)
    x, t = torch.randn(2, 1, 28, 28), torch.full((2,), 0.5)
    cond = random_cond(2)
    noisy = {
        "text_states": cond["text_states"] + (1 - cond["text_mask"])[..., None] * 5.0,
        "text_mask": cond["text_mask"],
    }
    with torch.no_grad():
        torch.testing.assert_close(g(x, t, t, cond), g(x, t, t, noisy), atol=1e-5, rtol=1e-5)


def test_unconditional_and_scalar_times(family):
    g = make_generator(family)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        a = g(x, 0.9, 0.0, {})
        b = g(x, torch.full((2,), 0.9), torch.zeros(2), None)
    assert torch.equal(a, b)


def test_reference_image_conditions_the_output(family):
    g = make_generator(family)
    x, t = torch.randn(2, 1, 28, 28), torch.full((2,), 0.8)
    base = random_cond(2)
    with torch.no_grad():
        r1 = g(x, t, t * 0, {**base, "ref_image": torch.randn(2, 1, 28, 28)})
        r2 = g(x, t, t * 0, {**base, "ref_image": torch.randn(1, 1, 28, 28)})
    assert r1.shape == x.shape and (r1 - r2).abs().mean() > 1e-4


def test_bad_inputs_are_clear_errors(family):
    g = make_generator(family)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="x has 3 channels, the model expects 1"):
        g(torch.randn(2, 3, 28, 28), 0.5, 0.5)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        g(torch.randn(2, 1, 30, 30), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        g(x, torch.rand(3), torch.rand(2))
    with pytest.raises(ValueError, match="text_states"):
        g(x, 0.5, 0.5, {"text_states": torch.randn(2, 4, 100)})
    with pytest.raises(ValueError, match="has batch 3, x has 2"):
        g(x, 0.5, 0.5, random_cond(3))
    with pytest.raises(ValueError, match="x must be"):
        g(torch.randn(1, 28, 28), 0.5, 0.5)


def test_bf16_weights_take_fp32_inputs(family):
    g = make_generator(family).to(torch.bfloat16)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = g(x, torch.tensor([0.9, -0.5]), torch.tensor([0.2, -0.5]), random_cond(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_generator_trains_on_a_batch(family):
    """A few steps fit one fixed target: the module is an ordinary, trainable velocity model."""
    torch.manual_seed(0)
    g = make_generator(family)
    x, t, r = torch.randn(8, 1, 28, 28), torch.rand(8), torch.rand(8) * 0.2
    cond, target = random_cond(8), torch.randn(8, 1, 28, 28) * 0.5
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (g(x, t, r, cond) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_pickle_and_deepcopy_keep_the_two_time_embedder(family):
    import copy
    import pickle

    g = make_generator(family, lora={"rank": 2})
    x, t, r, cond = torch.randn(2, 1, 28, 28), torch.rand(2), torch.rand(2) * 0.5, random_cond(2)
    with torch.no_grad():
        want = g(x, t, r, cond)
        for other in (pickle.loads(pickle.dumps(g)), copy.deepcopy(g)):
            assert torch.equal(other(x, t, r, cond), want)
