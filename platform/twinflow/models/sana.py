"""SANA (SanaTransformer2DModel) as a TwinFlow backbone.

SANA takes and returns (B, C, H, W) itself (conv patch embedding, unpatchify inside), so no packing
is needed. Its timestep embedder is `time_embed.emb` (inside AdaLayerNormSingle, whose shared
SiLU+Linear then turns temb into the block modulations). Timesteps are in 0..1000 times
`config.timestep_scale`, as the SANA pipelines pass them. An editing reference image is placed to
the right of the target (in-context, width-concatenated) and the output is cropped back: SANA's
patch embedding and convolutional FFN work on a 2-D grid, so side-by-side is the natural way to show
it a second image.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings
from torch import nn

from twinflow.models.family import Family
from twinflow.models.presets import Preset
from twinflow.models.time_embed import TwoTimeMixin


class TwoTimePixArtAlphaCombinedTimestepSizeEmbeddings(
    TwoTimeMixin, PixArtAlphaCombinedTimestepSizeEmbeddings
):
    """SANA's timestep embedder with E2 added (see time_embed.py)."""


class SanaFamily(Family):
    name = "sana"
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.conv_inverted",
        "ff.conv_point",
        "time_embed.linear",
        "timestep_embedder.linear_1",
        "timestep_embedder.linear_2",
    )

    def backbone_class(self) -> type[nn.Module]:
        return SanaTransformer2DModel

    def preset_config(self, preset: Preset, channels: int, patch: int, image_size: int) -> dict[str, Any]:
        dims = dict(preset.dims)
        inner = dims["num_attention_heads"] * dims["attention_head_dim"]
        return {
            "in_channels": channels,
            "out_channels": channels,
            "patch_size": patch,
            "sample_size": image_size,
            "cross_attention_dim": inner,
            **dims,
        }

    def time_embedder(self, backbone: nn.Module) -> tuple[nn.Module, type]:
        return backbone.time_embed.emb, TwoTimePixArtAlphaCombinedTimestepSizeEmbeddings

    def time_scale(self, backbone: nn.Module) -> float:
        return 1000.0 * float(getattr(backbone.config, "timestep_scale", 1.0))

    def text_dim(self, backbone: nn.Module) -> int:
        return int(backbone.config.caption_channels)

    def patch(self, backbone: nn.Module) -> int:
        return int(backbone.config.patch_size)

    def channels(self, backbone: nn.Module) -> int:
        return int(backbone.config.out_channels or backbone.config.in_channels)

    def check_backbone(self, backbone: nn.Module) -> None:
        cfg = backbone.config
        if cfg.guidance_embeds:
            raise ValueError("sana: guidance_embeds=True is not supported (TwinFlow bakes CFG into training)")
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ValueError(
                f"sana: in_channels={cfg.in_channels} and out_channels={cfg.out_channels} must match "
                "(the output is a velocity of the input state)"
            )

    def forward(
        self,
        backbone: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref: torch.Tensor | None,
    ) -> torch.Tensor:
        w = x.shape[-1]
        if ref is not None:
            x = torch.cat([x, ref], dim=-1)
        out = backbone(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_attention_mask=text_mask,
            timestep=timestep,
            return_dict=False,
        )[0]
        return out[..., :w]


FAMILY = SanaFamily()
