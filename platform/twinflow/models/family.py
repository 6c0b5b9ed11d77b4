"""The interface every backbone family implements (twinflow.models.registry finds and imports them):
how to build its diffusers transformer, where its timestep embedder E1 lives, what units its timestep
is in, how pixels/latents become its tokens and back, and how text conditioning enters. A module of
its own so the family modules, which the registry imports on first use, import nothing back from it.
"""

from __future__ import annotations

import inspect
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from twinflow.models.fetch import local_model_dir
from twinflow.models.presets import Preset


class Family(ABC):
    name: ClassVar[str]
    #: module-name suffixes peft targets by default: attention projections, MLPs, timestep embedders.
    lora_targets: ClassVar[tuple[str, ...]]

    @abstractmethod
    def backbone_class(self) -> type[nn.Module]:
        """The diffusers transformer class."""

    @abstractmethod
    def preset_config(self, preset: Preset, channels: int, patch: int, image_size: int) -> dict[str, Any]:
        """The diffusers config for a preset at the given pixel/latent geometry."""

    @abstractmethod
    def time_embedder(self, backbone: nn.Module) -> tuple[nn.Module, type]:
        """(E1 module, its TwoTimeMixin subclass)."""

    @abstractmethod
    def time_scale(self, backbone: nn.Module) -> float:
        """Backbone timestep units per unit of our t (1 for Qwen-Image, 1000 for SANA)."""

    @abstractmethod
    def text_dim(self, backbone: nn.Module) -> int:
        """Width of the text states the backbone consumes (our projection's output)."""

    @abstractmethod
    def patch(self, backbone: nn.Module) -> int: ...

    @abstractmethod
    def channels(self, backbone: nn.Module) -> int:
        """Channels of the (B, C, H, W) state the backbone models."""

    @abstractmethod
    def forward(
        self,
        backbone: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref: torch.Tensor | None,
    ) -> torch.Tensor:
        """Velocity with x's shape; `ref` (same shape as x) is a clean reference image for editing."""

    def check_backbone(self, backbone: nn.Module) -> None:
        """Raise on backbone options this family wrapper does not support (default: none)."""
        return None

    # -- shared helpers -------------------------------------------------------------------------

    def build_backbone(self, config: Mapping[str, Any]) -> nn.Module:
        cls = self.backbone_class()
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"model family {self.name!r}: unknown {cls.__name__} option(s) {unknown}; "
                f"valid options: {', '.join(sorted(allowed))}"
            )
        backbone = cls.from_config(dict(config))
        self.check_backbone(backbone)
        return backbone

    def load_backbone(self, path: str | Path, torch_dtype: torch.dtype | None = None) -> nn.Module:
        """from_pretrained on a diffusers pipeline dir (uses `transformer/`) or a transformer dir."""
        root = transformer_dir(path)
        cls = self.backbone_class()
        found = json.loads((root / "config.json").read_text()).get("_class_name")
        if found is not None and found != cls.__name__:
            raise ValueError(f"{root}: holds a {found}, but model family {self.name!r} needs {cls.__name__}")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        if _inside_zero_init():
            # diffusers' loader builds on the meta device first, which deepspeed.zero.Init cannot
            # partition: build from the config (partitioned as each module is made), then stream
            from twinflow.models.streamed import load_backbone_streamed

            backbone = cls.from_config(cls.load_config(str(root)))
            load_backbone_streamed(backbone, root)
            self.check_backbone(backbone)
            return backbone
        notice = _DropE2Notice()
        diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
        diffusers_log.addFilter(notice)
        try:
            backbone = cls.from_pretrained(str(root), **kwargs)
        finally:
            diffusers_log.removeFilter(notice)
        self.check_backbone(backbone)
        return backbone


def _inside_zero_init() -> bool:
    """Whether modules built now are partitioned by an active `deepspeed.zero.Init`."""
    import sys

    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return bool(module is not None and getattr(module, "zero_init_context", 0))


class _DropE2Notice(logging.Filter):
    """Hide diffusers' "weights not used" warning when the only unused weights are our E2 (loaded later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "were not used when initializing" not in msg or "[" not in msg:
            return True
        keys = [k.strip(" '\"") for k in msg.rsplit("[", 1)[1].rstrip("]").split(",")]
        return not all(".twin_e2." in f".{k}" for k in keys if k)


def transformer_dir(path: str | Path) -> Path:
    """A diffusers pipeline directory's `transformer/` subfolder, or the directory itself (s3://: cached)."""
    root = local_model_dir(path)
    if (root / "transformer" / "config.json").is_file():
        return root / "transformer"
    if (root / "config.json").is_file():
        return root
    raise FileNotFoundError(
        f"{root}: no diffusers transformer here (expected config.json or transformer/config.json)"
    )
