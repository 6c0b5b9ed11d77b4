"""Parameter counts of a job's generator, built on the meta device (no weights are read or allocated).

A pretrained directory contributes only its `config.json`: its transformer is rebuilt from that
config under a preset of the same family, which the model section's `backbone:` overrides fully.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import torch

from twinflow.models.config import ModelConfig

# The model modules (diffusers' transformer classes, presets, the published-config helpers) load inside
# the functions that build or count a model: `twinflow plan --help` and the report's pure arithmetic
# (memory.py imports this module for its fitted figures) stay free of diffusers.

# diffusers bookkeeping keys in a saved config.json that are not constructor arguments
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclass(frozen=True)
class ModelCounts:
    """What the memory model needs to know about the network."""

    total: int  # every parameter (backbone, E2, text projection, LoRA)
    trainable: int  # requires_grad after LoRA (all of them without LoRA)
    largest_layer: int  # parameters of the biggest transformer block (ZeRO-3 gathers one at a time)
    largest_module: int  # own parameters of the biggest single module (a ZeRO-3 build gathers one)
    lora_trainable: int  # trainable LoRA parameters (an average holds them as a second adapter)
    layers: int
    width: int  # attention width = heads * head_dim
    heads: int
    image_tokens: int  # tokens of one target image (editing doubles them)
    text_tokens: int
    text_width: int  # width J of the caption states the backbone reads (3584 from Qwen2.5-VL)
    text_input_width: int  # width of the caption states fed to the generator (384: MiniLM, projected)
    state_shape: tuple[int, int, int]  # (C, H, W) of the pixel or latent state
    configs: tuple[str, ...] = ()  # which config each pretrained component was counted from


def meta_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with a pretrained backbone replaced by its own config (read from config.json) as a preset."""
    if cfg.pretrained_path is None:
        return cfg
    from twinflow.models.presets import PRESETS
    from twinflow.models.registry import get_family, transformer_dir

    root = transformer_dir(cfg.pretrained_path)
    raw = json.loads((root / "config.json").read_text())
    # like diffusers' from_pretrained, keys the class no longer takes are ignored (the published
    # Qwen-Image config still carries `pooled_projection_dim`)
    accepted = set(inspect.signature(get_family(cfg.family).backbone_class().__init__).parameters)
    backbone = {k: v for k, v in raw.items() if k not in _META_KEYS and k in accepted}
    preset = next(iter(PRESETS[cfg.family].values()))
    return cfg.model_copy(
        update={
            "pretrained_path": None,
            "text_encoder_path": cfg.text_encoder_spec["path"],
            "preset": preset.name,
            "backbone": backbone,
            "patch": int(backbone.get("patch_size", preset.patch)),
        }
    )


def build_meta_generator(cfg: ModelConfig):
    """The job's TwinFlowGenerator (LoRA included) with every tensor on the meta device."""
    from twinflow.models import build_generator

    with torch.device("meta"):
        return build_generator(meta_model_config(cfg))


def count_model(cfg: ModelConfig) -> ModelCounts:
    """Counts from the job's own config.json files, or the family's published ones where its paths
    hold none (`plan.published`)."""
    from twinflow.plan.published import with_published_configs

    with with_published_configs(cfg) as (resolved, configs):
        gen = build_meta_generator(resolved)
    backbone = gen.backbone
    blocks = _blocks(backbone)
    c = backbone.config
    heads = int(c.num_attention_heads)
    c_state, h, w = gen.sample_shape
    return ModelCounts(
        total=sum(p.numel() for p in gen.parameters()),
        trainable=sum(p.numel() for p in gen.parameters() if p.requires_grad),
        largest_layer=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in gen.modules()),
        lora_trainable=sum(
            p.numel() for n, p in gen.named_parameters() if p.requires_grad and ".lora_" in f".{n}"
        ),
        layers=len(blocks),
        width=heads * int(c.attention_head_dim),
        heads=heads,
        image_tokens=(h // gen.patch) * (w // gen.patch),
        text_tokens=int(cfg.text_max_length),
        text_width=int(gen.family.text_dim(backbone)),
        text_input_width=int(getattr(gen.text_proj, "in_features", gen.family.text_dim(backbone))),
        state_shape=(int(c_state), int(h), int(w)),
        configs=tuple(configs),
    )


def _blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    for name in ("transformer_blocks", "blocks"):
        if isinstance(getattr(backbone, name, None), torch.nn.ModuleList):
            return list(getattr(backbone, name))
    raise ValueError(f"{type(backbone).__name__}: no transformer_blocks list to plan layer by layer")
