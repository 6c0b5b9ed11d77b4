"""Qwen-Image (QwenImageTransformer2DModel, the 20B target's class) as a TwinFlow backbone.

Tokens: (B, C, H, W) is cut into p x p patches, each flattened channel-major to C*p*p features,
exactly as the Qwen-Image pipeline packs its 16-channel latents (so pretrained weights see what they
were trained on). RoPE positions come from `img_shapes`. An editing reference image is packed the
same way and appended after the target tokens as a second entry of `img_shapes`; the output is
sliced back to the target tokens. Timesteps: the embedder scales by 1000 itself, so t in [-1, 1] goes
in unscaled.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
from torch import nn

from twinflow.models.family import Family
from twinflow.models.presets import Preset
from twinflow.models.time_embed import TwoTimeMixin


class TwoTimeQwenTimestepProjEmbeddings(TwoTimeMixin, QwenTimestepProjEmbeddings):
    """Qwen-Image's timestep embedder with E2 added (see time_embed.py)."""


def pack_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p), Qwen-Image's latent packing order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_patches(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `pack_patches` for an output of C*p*p features per token."""
    b, n, f = tokens.shape
    c = f // (p * p)
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class QwenImageFamily(Family):
    name = "qwen_image"
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
        "img_mod.1",
        "txt_mod.1",
        "timestep_embedder.linear_1",
        "timestep_embedder.linear_2",
    )

    def backbone_class(self) -> type[nn.Module]:
        return QwenImageTransformer2DModel

    def preset_config(self, preset: Preset, channels: int, patch: int, image_size: int) -> dict[str, Any]:
        dims = dict(preset.dims)
        rope = tuple(dims.pop("axes_dims_rope"))
        if sum(rope) != dims["attention_head_dim"]:
            raise ValueError(
                f"qwen_image preset {preset.name!r}: axes_dims_rope {rope} must sum to "
                f"attention_head_dim {dims['attention_head_dim']}"
            )
        return {
            "patch_size": patch,
            "in_channels": channels * patch * patch,
            "out_channels": channels,
            "axes_dims_rope": rope,
            **dims,
        }

    def time_embedder(self, backbone: nn.Module) -> tuple[nn.Module, type]:
        return backbone.time_text_embed, TwoTimeQwenTimestepProjEmbeddings

    def time_scale(self, backbone: nn.Module) -> float:
        return 1.0

    def text_dim(self, backbone: nn.Module) -> int:
        return int(backbone.config.joint_attention_dim)

    def patch(self, backbone: nn.Module) -> int:
        return int(backbone.config.patch_size)

    def channels(self, backbone: nn.Module) -> int:
        return int(backbone.out_channels)

    def check_backbone(self, backbone: nn.Module) -> None:
        cfg = backbone.config
        p, c = int(cfg.patch_size), int(backbone.out_channels)
        if int(cfg.in_channels) != c * p * p:
            raise ValueError(
                f"qwen_image: in_channels={cfg.in_channels} must equal out_channels*patch^2 "
                f"= {c}*{p}^2 = {c * p * p} (one patch of the state per token)"
            )
        if cfg.guidance_embeds:
            raise ValueError(
                "qwen_image: guidance_embeds=True is not supported (TwinFlow bakes CFG into training)"
            )
        if getattr(cfg, "use_additional_t_cond", False):
            raise ValueError("qwen_image: use_additional_t_cond=True is not supported")

    def forward(
        self,
        backbone: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref: torch.Tensor | None,
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch(backbone)
        tokens = pack_patches(x, p)
        shapes = [(1, h // p, w // p)]
        if ref is not None:
            tokens = torch.cat([tokens, pack_patches(ref, p)], dim=1)
            shapes.append((1, ref.shape[-2] // p, ref.shape[-1] // p))
        n_target = (h // p) * (w // p)
        out = backbone(
            hidden_states=tokens,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=text_mask,
            timestep=timestep,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack_patches(out[:, :n_target], h, w, p)


FAMILY = QwenImageFamily()
