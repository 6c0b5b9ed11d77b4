"""The two-time embedder: r = t is the base model exactly; r enters through E2 with factor (t - r)."""

import copy

import pytest
import torch
from conftest import make_generator, random_cond

from twinflow.models.registry import get_family
from twinflow.models.time_embed import TwoTimeMixin, e2_parameters, install_two_time, pack_times, split_times


def _base_and_generator(family: str, e2_init: str = "copy", **kw):
    """A generator plus an untouched copy of its backbone taken before E2 was installed."""
    from twinflow.models.generator import TwinFlowGenerator
    from twinflow.models.presets import get_preset

    fam = get_family(family)
    preset = get_preset(family, "tiny-28g")
    torch.manual_seed(0)
    backbone = fam.build_backbone({**fam.preset_config(preset, 1, preset.patch, 28), **kw})
    base = copy.deepcopy(backbone)
    gen = TwinFlowGenerator(fam, backbone, sample_size=28, e2_init=e2_init)
    return base, gen


def _base_forward(gen, base, x, t, cond):
    text = gen.text_proj(cond["text_states"])
    return gen.family.forward(base, x, t * gen.time_scale, text, cond["text_mask"], cond.get("ref_image"))


@pytest.mark.parametrize("e2_init", ["copy", "random"])
def test_r_equals_t_is_the_base_model_exactly(family, e2_init):
    base, gen = _base_and_generator(family, e2_init)
    x, t = torch.randn(6, 1, 28, 28), torch.tensor([1.0, 0.9, 0.5, 0.01, -0.3, -1.0])
    cond = random_cond(6)
    with torch.no_grad():
        assert torch.equal(gen(x, t, t, cond), _base_forward(gen, base, x, t, cond))


def test_r_enters_per_row_and_only_through_e2(family):
    """Each row's r moves that row's output only (rows with r = t in the same batch stay the r = t
    answer, each row equals itself computed alone), different r give different outputs, and with E2
    zeroed r has no effect: r reaches the model through (t - r) E2(r) and nothing else."""
    _, gen = _base_and_generator(family)
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 0.8)
    r = torch.tensor([0.8, 0.0, 0.4, 0.8])
    cond = random_cond(4)
    with torch.no_grad():
        inst, mixed = gen(x, t, t, cond), gen(x, t, r, cond)
        for i in range(4):
            alone = gen(x[i : i + 1], t[i : i + 1], r[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[[0, 3]], inst[[0, 3]], atol=1e-5, rtol=1e-5)
        for i in (1, 2):
            assert (mixed[i] - inst[i]).abs().mean() > 1e-3, f"row {i}: r = {r[i]} left the output as r = t"
        same = {k: v[[1, 1]] for k, v in cond.items()}
        far = gen(x[[1, 1]], t[:2], torch.tensor([0.0, 0.4]), same)  # one input, two values of r
        assert (far[0] - far[1]).abs().mean() > 1e-4  # the output depends on r's value, not only r != t
        for _, p in e2_parameters(gen):
            p.zero_()
        torch.testing.assert_close(gen(x, t, r, cond), inst, atol=1e-5, rtol=1e-5)


def test_embedding_is_e1_plus_gap_times_e2(family):
    _, gen = _base_and_generator(family, e2_init="random")
    emb, _ = gen.family.time_embedder(gen.backbone)
    t, r = torch.tensor([0.9, -0.4]), torch.tensor([0.2, -0.4])
    s = gen.time_scale
    args = (torch.zeros(2, 3),) if family == "qwen_image" else ()
    kwargs = (
        {}
        if family == "qwen_image"
        else {"resolution": None, "aspect_ratio": None, "batch_size": 2, "hidden_dtype": torch.float32}
    )
    with torch.no_grad():
        got = emb(pack_times(t, r, s), *args, **kwargs)
        e1 = super(TwoTimeMixin, emb).forward(t * s, *args, **kwargs)
        e2 = emb.twin_e2(r * s, *args, **kwargs)
    torch.testing.assert_close(got, e1 + (t - r)[:, None] * e2, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[1], e1[1])  # r = t row: E2 contributes nothing
    assert (e2[0] - e1[0]).abs().max() > 1e-3  # random E2 is not E1


def test_gradient_reaches_e1_e2_and_projection(family):
    _, gen = _base_and_generator(family)
    x, t, r = torch.randn(4, 1, 28, 28), torch.rand(4) * 0.5 + 0.5, torch.rand(4) * 0.4
    gen(x, t, r, random_cond(4)).square().mean().backward()
    emb, _ = gen.family.time_embedder(gen.backbone)
    e1 = [p for n, p in emb.named_parameters() if not n.startswith("twin_e2.")]
    e2 = [p for _, p in e2_parameters(gen)]
    assert e1 and e2
    for group, name in ((e1, "E1"), (e2, "E2"), (list(gen.text_proj.parameters()), "text_proj")):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group), name


def test_finite_at_t_equals_r_and_negative_t(family):
    _, gen = _base_and_generator(family)
    x = torch.randn(5, 1, 28, 28)
    t = torch.tensor([0.0, 1.0, -1.0, -0.5, 1e-6])
    with torch.no_grad():
        same = gen(x, t, t, random_cond(5))
        neg = gen(x, -t.abs() - 0.1, -t.abs() - 0.1, random_cond(5))
        pos = gen(x, t.abs() + 0.1, t.abs() + 0.1, random_cond(5))
    assert torch.isfinite(same).all() and torch.isfinite(neg).all()
    assert (neg - pos).abs().mean() > 1e-3  # signed time is distinguishable


def test_plain_timestep_runs_e1_only(family):
    base, gen = _base_and_generator(family)
    emb, _ = gen.family.time_embedder(gen.backbone)
    base_emb, _ = gen.family.time_embedder(base)
    t = torch.tensor([0.3, 0.7]) * gen.time_scale
    args = (torch.zeros(2, 3),) if family == "qwen_image" else ()
    kwargs = (
        {}
        if family == "qwen_image"
        else {"resolution": None, "aspect_ratio": None, "batch_size": 2, "hidden_dtype": torch.float32}
    )
    with torch.no_grad():
        assert torch.equal(emb(t, *args, **kwargs), base_emb(t, *args, **kwargs))


def test_e1_keeps_its_diffusers_parameter_names(family):
    base, gen = _base_and_generator(family)
    base_keys = set(base.state_dict())
    keys = set(gen.backbone.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert extra and all(".twin_e2." in k for k in extra)


def test_autocast_bf16_keeps_r_equals_t_exact(family):
    base, gen = _base_and_generator(family)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.75, -0.25])
    cond = random_cond(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(x, t, t, cond)
        ref = _base_forward(gen, base, x, t, cond)
        jump = gen(x, t, t - 0.5, cond)
    assert out.dtype == torch.float32 and torch.isfinite(jump).all()
    assert torch.equal(out, ref.float())


def test_gradient_checkpointing_gives_same_gradients(family):
    torch.manual_seed(0)
    plain = make_generator(family)
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.enable_gradient_checkpointing()
    x, t, r = torch.randn(3, 1, 28, 28), torch.tensor([0.9, 0.5, -0.4]), torch.tensor([0.1, 0.5, -0.4])
    cond = random_cond(3)
    for g in (plain, ckpt):
        g(x, t, r, cond).square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_qwen_zero_cond_t_and_reference_tokens():
    base, gen = _base_and_generator("qwen_image", zero_cond_t=True)
    x, ref, t = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28), torch.tensor([0.6, 0.2])
    cond = {**random_cond(2), "ref_image": ref}
    with torch.no_grad():
        assert torch.equal(gen(x, t, t, cond), _base_forward(gen, base, x, t, cond))
        assert (gen(x, t, t * 0, cond) - gen(x, t, t, cond)).abs().mean() > 1e-4


def test_pack_split_and_install_errors():
    t, r = torch.tensor([0.5, -0.2]), torch.tensor([0.1, -0.2])
    packed = pack_times(t, r, 1000.0)
    tb, gap = split_times(packed)
    torch.testing.assert_close(tb, t * 1000)
    torch.testing.assert_close(gap, t - r)
    assert split_times(t)[1] is None
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 2\)"):
        split_times(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        pack_times(t, r[:1], 1.0)
    _, gen = _base_and_generator("sana")
    emb, cls = gen.family.time_embedder(gen.backbone)
    with pytest.raises(ValueError, match="already"):
        install_two_time(emb, cls, e2_init="copy", time_scale=1.0)
    with pytest.raises(TypeError, match="TwoTimeMixin"):
        install_two_time(torch.nn.Linear(2, 2), cls, e2_init="copy", time_scale=1.0)
