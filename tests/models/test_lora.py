"""LoRA: the trainable set, a bit-identical frozen base, and the adapters-off teacher view."""

import copy

import pytest
import torch
from conftest import make_generator, random_cond

from twinflow.models.config import LoraSettings
from twinflow.models.lora import apply_lora, disable_adapters, lora_state_dict, merged_copy, trainable_names


def _step(g, x, t, r, cond, lr=1e-2):
    opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=lr)
    g(x, t, r, cond).square().mean().backward()
    opt.step()


def test_trainable_set_is_lora_e2_and_projection(family):
    g = make_generator(family, lora={"rank": 4})
    names = trainable_names(g)
    assert names and all(".lora_" in n or ".twin_e2." in n or n.startswith("text_proj.") for n in names)
    assert any(".twin_e2." in n for n in names) and "text_proj.weight" in names
    # E1's linears are adapted (timestep embedders are LoRA targets); E2 is trained in full, never adapted.
    assert any("timestep_embedder.linear_1.lora_A" in n and ".twin_e2." not in n for n in names)
    assert not any(".twin_e2." in n and ".lora_" in n for n, _ in g.named_parameters())
    assert any(n.endswith(".to_q.lora_A.default.weight") for n in names)
    frozen = [n for n, p in g.named_parameters() if not p.requires_grad]
    assert any(n.endswith("to_q.base_layer.weight") for n in frozen)


def test_base_bit_identical_after_a_step_and_teacher_view(family):
    torch.manual_seed(0)
    g = make_generator(family)
    plain = copy.deepcopy(g)
    apply_lora(g, LoraSettings(rank=4))
    frozen = {n: p.detach().clone() for n, p in g.named_parameters() if not p.requires_grad}
    x, t, r, cond = torch.randn(4, 1, 28, 28), torch.rand(4), torch.rand(4) * 0.3, random_cond(4)
    with torch.no_grad():  # LoRA B starts at zero: the adapted model is the plain model
        torch.testing.assert_close(g(x, t, r, cond), plain(x, t, r, cond), atol=1e-6, rtol=1e-6)
    for _ in range(2):
        _step(g, x, t, r, cond)
    assert all(torch.equal(frozen[n], p) for n, p in g.named_parameters() if n in frozen)
    with torch.no_grad():
        online = g(x, t, t, cond)
        with disable_adapters(g):
            teacher = g(x, t, t, cond)
        after = g(x, t, t, cond)
    assert (online - teacher).abs().mean() > 1e-4
    assert torch.equal(online, after)  # adapters come back on
    # At r = t E2 is silent, so adapters-off is the base backbone (with the trained text projection).
    plain.text_proj.load_state_dict(g.text_proj.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(teacher, plain(x, t, t, cond), atol=1e-6, rtol=1e-6)


def test_disable_adapters_restores_on_error_and_needs_lora(family):
    g = make_generator(family, lora={"rank": 2})
    with pytest.raises(RuntimeError):
        with disable_adapters(g):
            raise RuntimeError("boom")
    assert all(not getattr(m, "disable_adapters", False) for m in g.modules() if hasattr(m, "lora_A"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with disable_adapters(make_generator(family)):
            pass


def test_custom_targets_and_bad_targets(family):
    g = make_generator(family, lora={"rank": 2, "target_modules": ["to_q"]})
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable_names(g) if ".lora_" in n}
    assert adapted and all(n.endswith("to_q") for n in adapted)
    with pytest.raises(ValueError, match=rf"LoRA for model family '{family}'.*no_such_layer"):
        make_generator(family, lora={"rank": 2, "target_modules": ["no_such_layer"]})


def test_merged_copy_matches_and_leaves_original(family):
    torch.manual_seed(0)
    g = make_generator(family, lora={"rank": 4, "alpha": 8})
    x, t, r, cond = torch.randn(2, 1, 28, 28), torch.rand(2), torch.rand(2) * 0.3, random_cond(2)
    _step(g, x, t, r, cond)
    merged = merged_copy(g)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert set(merged.backbone.state_dict()) == {
        k.replace(".base_layer", "") for k in g.backbone.state_dict() if ".lora_" not in k
    }
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, r, cond), g(x, t, r, cond), atol=1e-5, rtol=1e-5)
    assert any(".lora_" in n for n, _ in g.named_parameters())
    sd = lora_state_dict(g)
    assert sd and all("lora_" in k for k in sd)
