"""`model.fake_branch: mirror`: the negative-time branch starts as an exact copy of the positive one."""

import pytest
import torch

from twinflow.models import build_generator
from twinflow.models.config import ModelConfig
from twinflow.models.export_loader import load_generator
from twinflow.models.export_writer import save_generator
from twinflow.models.time_embed import fake_branch_of


def _gen(fake_branch, family="qwen_image"):
    torch.manual_seed(0)
    return build_generator(
        ModelConfig(family=family, preset="tiny-28g", fake_branch=fake_branch, text_max_length=8)
    )


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 28, 28, generator=g)
    cond = {
        "text_states": torch.randn(b, 8, 384, generator=g),
        "text_mask": torch.ones(b, 8, dtype=torch.long),
    }
    return x, torch.rand(b, generator=g) * 0.9 + 0.05, cond


@pytest.mark.parametrize("family", ["qwen_image", "sana"])
def test_mirror_starts_with_the_fake_branch_equal_to_the_real_one(family):
    x, t, cond = _inputs()
    mirror, signed = _gen("mirror", family), _gen("signed", family)
    with torch.no_grad():
        pos, neg = mirror(x, t, t, cond), mirror(x, -t, -t, cond)
        assert torch.equal(pos, neg)
        # the positive branch is untouched by the sign embedding: same weights, same answers as "signed"
        signed.load_state_dict({k: v for k, v in mirror.state_dict().items() if "twin_sign" not in k})
        assert torch.allclose(signed(x, t, t, cond), pos, atol=1e-6)
        assert not torch.allclose(signed(x, -t, -t, cond), neg, atol=1e-3)  # the reference's start differs


def test_the_sign_gate_learns_and_only_moves_the_negative_branch():
    x, t, cond = _inputs()
    model = _gen("mirror")
    gate = next(p for n, p in model.named_parameters() if n.endswith("twin_sign.gate"))
    model(x, -t, -t, cond).pow(2).mean().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    with torch.no_grad():
        before = model(x, t, t, cond)
        gate.add_(0.5)
        assert torch.equal(model(x, t, t, cond), before)
        assert not torch.allclose(model(x, -t, -t, cond), before, atol=1e-4)


def test_export_round_trip_keeps_the_fake_branch(tmp_path):
    x, t, cond = _inputs()
    model = _gen("mirror")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("twin_sign.gate")).fill_(0.3)
    save_generator(model, tmp_path / "export", {"method": "twinflow"})
    loaded, meta = load_generator(tmp_path / "export")
    assert meta["fake_branch"] == "mirror" and fake_branch_of(loaded) == "mirror"
    assert fake_branch_of(_gen("signed")) == "signed"
    with torch.no_grad():
        assert torch.allclose(loaded(x, -t, -t, cond), model(x, -t, -t, cond), atol=1e-6)


def test_unknown_fake_branch_is_a_config_error():
    with pytest.raises(ValueError, match="fake_branch"):
        ModelConfig(preset="tiny-28g", fake_branch="flipped")


def test_a_mirror_fine_tune_starts_from_a_signed_base(tmp_path):
    """The usual case: a flow-matching base ("signed", it never saw t < 0) fine-tuned with mirror."""
    from pathlib import Path

    from twinflow.train import modelling
    from twinflow.train.config import load_job

    x, t, cond = _inputs()
    base = _gen("signed")
    save_generator(base, tmp_path / "base", {"method": "flow_matching"})
    repo = Path(__file__).resolve().parents[2]
    job = load_job(
        repo / "jobs" / "mnist_twinflow.yaml",
        [f"train.init_from={tmp_path / 'base'}", "model.fake_branch=mirror", "model.text_max_length=8"],
    )
    model = modelling.build_model(job)
    assert fake_branch_of(model) == "mirror"
    with torch.no_grad():
        assert torch.allclose(model(x, t, t, cond), base(x, t, t, cond), atol=1e-6)
        assert torch.equal(model(x, -t, -t, cond), model(x, t, t, cond))
    assert fake_branch_of(load_generator(tmp_path / "base")[0]) == "signed"
