"""LoRA on the backbone (peft), and the adapters-off view used as a frozen teacher.

Trainable after `apply_lora`: the lora_* matrices, E2 (trained in full, never adapted: its r-path
is new to the base model, and a frozen base copy at r != t is not the base model's behaviour
anyway) and the text projection. Everything else keeps requires_grad False and stays bit-identical.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from twinflow.models.config import LoraSettings
from twinflow.models.time_embed import E2_PREFIX

ADAPTER = "default"


def _is_lora(name: str) -> bool:
    return ".lora_" in f".{name}"


def _is_e2(name: str) -> bool:
    return f".{E2_PREFIX}." in f".{name}"


def trainable_names(generator: nn.Module) -> list[str]:
    return [n for n, p in generator.named_parameters() if p.requires_grad]


def has_lora(generator: nn.Module) -> bool:
    return any(_is_lora(n) for n, _ in generator.named_parameters())


def apply_lora(generator: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into the backbone and freeze everything but lora_*, E2 and text_proj."""
    if has_lora(generator):
        raise ValueError("this generator already has LoRA adapters")
    targets = list(settings.target_modules or generator.family.lora_targets)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.scale_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        exclude_modules=rf".*\.{E2_PREFIX}\..*",
        init_lora_weights=True,
    )
    try:
        generator.backbone.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as exc:
        raise ValueError(
            f"LoRA for model family {generator.family.name!r}: {exc} (target_modules={targets})"
        ) from None
    for name, p in generator.named_parameters():
        p.requires_grad_(_is_lora(name) or _is_e2(name) or name.startswith("text_proj."))


@contextmanager
def disable_adapters(generator: nn.Module) -> Iterator[nn.Module]:
    """Run the base backbone (adapters off) inside the block; E2 and text_proj stay as trained.

    Toggles module state: do not run online forwards of the same generator from another thread
    while inside the block.
    """
    if not has_lora(generator):
        raise ValueError("disable_adapters: this generator has no LoRA adapters")
    generator.backbone.disable_adapters()
    try:
        yield generator
    finally:
        generator.backbone.enable_adapters()


def lora_state_dict(generator: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone in peft's key format (loadable with peft's set_peft_model_state_dict)."""
    return get_peft_model_state_dict(generator.backbone, adapter_name=ADAPTER)


def merged_copy(generator: nn.Module) -> nn.Module:
    """A deep copy with every adapter merged into its base layer and the peft wrappers removed."""
    out = copy.deepcopy(generator)
    names = [n for n, m in out.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        layer = getattr(parent, child)
        layer.merge(safe_merge=True)
        setattr(parent, child, layer.get_base_layer())
    backbone = out.backbone
    if hasattr(backbone, "peft_config"):
        del backbone.peft_config
    backbone._hf_peft_config_loaded = False
    for p in out.parameters():
        p.requires_grad_(True)
    return out
