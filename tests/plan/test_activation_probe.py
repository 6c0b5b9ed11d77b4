"""The planner's activation probe: the configs it measures, what `measure` reports per row, and the
meter it reads. The fitted figures (activation_fit.json) come from these, so a probe that builds
another shape or counts from a wrong start would refit the planner wrongly without any plan test
noticing."""

from __future__ import annotations

import torch

from twinflow.models import build_generator
from twinflow.plan.activations import LiveBytes, measure, probe_config


def test_probe_config_builds_the_asked_shape_for_each_family():
    qwen = probe_config("qwen_image", layers=2, heads=2, head_dim=16, size=32, text=8, checkpointing=True)
    assert qwen.backbone == {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "axes_dims_rope": [8, 4, 4],  # the rotary axes fill the head: frame, height, width
    }
    assert (qwen.image_size, qwen.channels, qwen.patch, qwen.text_max_length) == (32, 4, 2, 8)
    assert qwen.gradient_checkpointing is True
    sana = probe_config("sana", layers=1, heads=2, head_dim=32, size=16, text=4, checkpointing=False)
    assert "axes_dims_rope" not in sana.backbone  # rope axes are Qwen-Image's alone
    assert sana.gradient_checkpointing is False
    with torch.device("meta"):
        gen = build_generator(qwen)
    c = gen.backbone.config
    assert (int(c.num_layers), int(c.num_attention_heads), int(c.attention_head_dim)) == (2, 2, 16)
    assert gen.sample_shape == (4, 32, 32)


def test_measure_reports_whole_bytes_per_row_and_the_token_count():
    cfg = probe_config("qwen_image", layers=1, heads=2, head_dim=16, size=16, text=4, checkpointing=False)
    one, again, two_rows = measure(cfg, rows=2), measure(cfg, rows=2), measure(cfg, rows=4)
    assert one == again  # seeded: the same config measures the same
    assert all(isinstance(v, int) for v in (one.saved, one.backward, one.transient))
    assert one.tokens == (16 // 2) ** 2 + 4  # image tokens at patch 2, then the caption's
    assert (one.layers, one.width, one.heads) == (1, 32, 2)
    assert one.saved > 0 and one.transient > 0
    # per row: twice the rows keep about the same bytes per row (not twice as many)
    assert 0.8 < two_rows.saved / one.saved < 1.25


def test_live_bytes_counts_from_zero_and_frees_what_dies():
    with LiveBytes() as meter:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # another 4000
        del a
        c = b + 1
        del b
    assert meter.peak == 8000
    assert meter.alive == 4000  # c alone
    del c
    assert meter.alive == 0
