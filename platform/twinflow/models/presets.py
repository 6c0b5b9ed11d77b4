"""Named backbone sizes per family, as plain data (importing this never imports diffusers).

A preset fixes the transformer's dimensions and a default pixel geometry; the job's `model:` section
may override image_size, channels and patch. Family modules turn (preset, channels, patch) into the
diffusers config. `tiny-*` presets are sized so one CPU core runs a forward+backward of batch 32 in
well under 100 ms (see docs/models.md for measured numbers); `small-*` are the next size up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int
    channels: int
    patch: int
    dims: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


def _qwen(
    name: str,
    size: int,
    ch: int,
    patch: int,
    layers: int,
    heads: int,
    head_dim: int,
    rope: tuple[int, int, int],
    joint: int,
    summary: str,
) -> Preset:
    dims = {
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "axes_dims_rope": rope,
        "joint_attention_dim": joint,
    }
    return Preset(name, size, ch, patch, dims, summary)


def _sana(
    name: str,
    size: int,
    ch: int,
    patch: int,
    layers: int,
    heads: int,
    head_dim: int,
    cross_heads: int,
    caption: int,
    mlp_ratio: float,
    summary: str,
) -> Preset:
    dims = {
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_cross_attention_heads": cross_heads,
        "cross_attention_head_dim": heads * head_dim // cross_heads,
        "caption_channels": caption,
        "mlp_ratio": mlp_ratio,
    }
    return Preset(name, size, ch, patch, dims, summary)


PRESETS: dict[str, dict[str, Preset]] = {
    "qwen_image": {
        p.name: p
        for p in [
            _qwen(
                "tiny-28g",
                28,
                1,
                4,
                3,
                2,
                32,
                (8, 12, 12),
                64,
                "28x28 gray (Fashion-MNIST/MNIST), 4x4 patches = 49 tokens",
            ),
            _qwen(
                "tiny-32rgb",
                32,
                3,
                4,
                3,
                2,
                32,
                (8, 12, 12),
                64,
                "32x32 RGB (emoji), 4x4 patches = 64 tokens",
            ),
            _qwen("small-28g", 28, 1, 2, 6, 4, 32, (8, 12, 12), 128, "28x28 gray, 2x2 patches = 196 tokens"),
            _qwen("small-32rgb", 32, 3, 2, 6, 4, 32, (8, 12, 12), 128, "32x32 RGB, 2x2 patches = 256 tokens"),
        ]
    },
    "sana": {
        p.name: p
        for p in [
            _sana(
                "tiny-28g",
                28,
                1,
                4,
                3,
                2,
                32,
                2,
                64,
                2.5,
                "28x28 gray (Fashion-MNIST/MNIST), 4x4 patches = 49 tokens",
            ),
            _sana("tiny-32rgb", 32, 3, 4, 3, 2, 32, 2, 64, 2.5, "32x32 RGB (emoji), 4x4 patches = 64 tokens"),
            _sana("small-28g", 28, 1, 2, 6, 4, 32, 4, 128, 2.5, "28x28 gray, 2x2 patches = 196 tokens"),
            _sana("small-32rgb", 32, 3, 2, 6, 4, 32, 4, 128, 2.5, "32x32 RGB, 2x2 patches = 256 tokens"),
        ]
    },
}


def family_names() -> list[str]:
    return sorted(PRESETS)


def check_family(family: str) -> None:
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(family_names())}")


def get_preset(family: str, name: str) -> Preset:
    """The named preset; an unknown family or preset is an error that names both and lists the options."""
    check_family(family)
    presets = PRESETS[family]
    if name not in presets:
        raise ValueError(
            f"unknown preset {name!r} for model family {family!r}; "
            f"known presets: {', '.join(sorted(presets))}"
        )
    return presets[name]
