import contextlib

import pytest
import torch
from torch import nn

from twinflow.method.ema import EMA, Teacher, next_decay

from .analytic import LinearVelocity


def _bump(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_warmup_sequence():
    d, k = 0.99, 0.0
    seq = []
    for _ in range(5):
        seq.append(k)
        k = next_decay(k, d)
    assert seq[0] == 0.0 and seq[1] == pytest.approx(0.495)
    assert seq[2] == pytest.approx(0.495 + 0.5 * 0.505 * 0.495)
    assert all(a < b < d for a, b in zip(seq, seq[1:]))
    for _ in range(200):
        k = next_decay(k, d)
    assert 0.98 < k < d  # slow approach once (1 - d_k) is small ...
    for _ in range(3000):
        k = next_decay(k, d)
    assert k == pytest.approx(d, abs=1e-6)  # ... but it converges to d


def test_ema_updates_use_the_current_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    _bump(model, 1.0)
    ema.update(model)  # d_0 = 0: exact copy
    assert torch.equal(ema.module.weight, model.weight)
    before = ema.module.weight.clone()
    _bump(model, 1.0)
    ema.update(model)  # d_1 = 0.45
    assert torch.allclose(ema.module.weight, 0.45 * before + 0.55 * model.weight)
    assert ema.current_decay == pytest.approx(next_decay(0.45, 0.9))
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_teacher_modes():
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    model = LinearVelocity()
    online = Teacher(model, "online")
    assert online.is_online and online.decay == 0.0
    out = online(x, t, t, {})
    assert not out.requires_grad and torch.equal(out, model(x, t, t, {}).detach())

    frozen = Teacher(model, "frozen")
    ref = frozen(x, t, t, {})
    _bump(model, 0.5)
    frozen.update()
    assert torch.equal(frozen(x, t, t, {}), ref) and not frozen.is_online and frozen.decay == 1.0

    ema = Teacher(model, "ema", decay=0.5)
    _bump(model, 0.5)
    ema.update()  # first update copies
    assert torch.allclose(ema(x, t, t, {}), model(x, t, t, {}))
    with pytest.raises(ValueError, match="unknown teacher mode"):
        Teacher(model, "swa")


def test_frozen_teacher_with_adapters_off_uses_the_online_module():
    model = LinearVelocity()
    entered = []

    @contextlib.contextmanager
    def adapters_off():
        entered.append(True)
        saved = model.b.detach().clone()
        with torch.no_grad():
            model.b.zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                model.b.copy_(saved)

    teacher = Teacher(model, "frozen", adapters_off=adapters_off)
    assert teacher.module is model
    x, t = torch.randn(2, 2), torch.full((2,), 0.3)
    out = teacher(x, t, t, {})
    assert entered == [True]
    assert torch.allclose(out, x @ model.A.T + 0.3 * model.c + 0.3 * model.d)
    with pytest.raises(ValueError, match="no weights of its own"):
        teacher.export_weights()
    with pytest.raises(ValueError, match="only applies"):
        Teacher(model, "ema", adapters_off=adapters_off)


def test_teacher_state_roundtrip_and_export():
    model = LinearVelocity()
    teacher = Teacher(model, "ema", decay=0.9)
    for _ in range(3):
        _bump(model, 0.1)
        teacher.update()
    state = teacher.state_dict()
    other = Teacher(LinearVelocity(), "ema", decay=0.9)
    other.load_state_dict(state)
    assert other.decay == teacher.decay and other.ema.num_updates == 3
    for k, v in teacher.export_weights().items():
        assert torch.equal(other.export_weights()[k], v)
    assert not torch.equal(teacher.export_weights()["A"], model.A.detach())  # lagging average
    with pytest.raises(ValueError, match="mode"):
        Teacher(LinearVelocity(), "frozen").load_state_dict(state)


def test_fp32_ema_teacher_serves_a_bf16_online_model():
    """DeepSpeed bf16 casts the online model after the teacher was built: the EMA stays fp32 (so small
    steps are not rounded away) and the teacher answers in the caller's dtype."""
    import torch
    from torch import nn

    from twinflow.method import Teacher

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, t, r, cond):
            return self.lin(x) * t[:, None] + cond["s"]

    torch.manual_seed(0)
    model = Tiny()
    teacher = Teacher(model, "ema", decay=0.999)
    model.to(torch.bfloat16)
    teacher.update()
    before = teacher.module.lin.weight.clone()
    with torch.no_grad():
        model.lin.weight.add_(0.01)
    for _ in range(30):
        teacher.update()  # decay climbs towards 0.999: steps of ~1e-5, below bf16 resolution near 0.3
    assert teacher.module.lin.weight.dtype == torch.float32
    assert not torch.equal(teacher.module.lin.weight, before)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    t = torch.rand(3, dtype=torch.bfloat16)
    out = teacher(x, t, t, {"s": torch.zeros(3, 4, dtype=torch.bfloat16)})
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4)
    expected = (teacher.module.lin(x.float()) * t.float()[:, None]).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_a_checkpoint_of_another_teacher_mode_is_refused_naming_both():
    saved = Teacher(nn.Linear(2, 2), "online").state_dict()
    with pytest.raises(ValueError, match=r"checkpoint teacher mode 'online' != configured 'ema'"):
        Teacher(nn.Linear(2, 2), "ema").load_state_dict(saved)


def test_a_frozen_teacher_restores_its_initial_weights_and_online_has_none_to_export():
    torch.manual_seed(0)
    first = Teacher(nn.Linear(2, 2), "frozen")
    torch.manual_seed(1)
    resumed = Teacher(nn.Linear(2, 2), "frozen")  # a resumed run's model has moved on from the initial one
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.module.weight, first.module.weight)
    assert torch.equal(resumed.export_weights()["weight"], first.module.weight)
    with pytest.raises(ValueError, match="'online' teacher has no weights of its own"):
        Teacher(nn.Linear(2, 2), "online").export_weights()
