import pytest
import torch

from twinflow.eval.guidance import effective_guidance


class _Base(torch.nn.Module):
    """v(x, t | c) = x * (1 + t) + label shift; the null label is 0."""

    def forward(self, x, t, r, cond):
        return x * (1 + t)[:, None, None, None] + cond["label"].float()[:, None, None, None]


class _Guided(torch.nn.Module):
    """The base's CFG at scale s: v_null + s (v_c - v_null)."""

    def __init__(self, s):
        super().__init__()
        self.s, self.base = s, _Base()

    def forward(self, x, t, r, cond):
        null = {"label": torch.zeros_like(cond["label"])}
        v_c, v_n = self.base(x, t, r, cond), self.base(x, t, r, null)
        return v_n + self.s * (v_c - v_n)


@pytest.mark.parametrize("s", [1.0, 1.8, 5.0])
def test_recovers_the_guidance_scale_of_a_guided_model(s):
    images = torch.randn(6, 1, 4, 4)
    cond = {"label": torch.arange(1, 7)}
    out = effective_guidance(_Guided(s), _Base(), images, cond, {"label": torch.zeros(1, dtype=torch.long)})
    assert out["scale"] == pytest.approx(s, rel=1e-5)
    assert all(v == pytest.approx(s, rel=1e-5) for k, v in out.items() if k.startswith("scale_t"))


def test_a_base_that_ignores_the_condition_is_a_clear_error():
    images = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="ignores the condition"):
        effective_guidance(
            _Guided(2.0),
            _Guided(0.0),
            images,
            {"label": torch.ones(2, dtype=torch.long)},
            {"label": torch.zeros(1, dtype=torch.long)},
        )
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        effective_guidance(
            _Base(),
            _Base(),
            images,
            {"label": torch.ones(2, dtype=torch.long)},
            {"label": torch.zeros(1, dtype=torch.long)},
            times=(0.0,),
        )
