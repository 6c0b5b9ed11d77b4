"""The job YAML's `model:` section. Validation here is pure (no diffusers import, no file access);
`build_generator` checks what needs files (pretrained configs, VAE geometry) with equally clear errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from twinflow.config import StrictModel
from twinflow.models.presets import check_family, get_preset


class LoraSettings(StrictModel):
    """LoRA on the backbone via peft; E2 and the text projection are always trained in full."""

    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha/r); default = rank")
    target_modules: list[str] | None = Field(
        None,
        description="module-name suffixes to adapt; default = the family's attention projections, "
        "MLPs and timestep embedders",
    )
    dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not s.strip() for s in v)):
            raise ValueError("target_modules must be a non-empty list of module names (or omitted)")
        return v

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class ModelConfig(StrictModel):
    """Which backbone, at what size, in pixel or latent space, and how r enters it."""

    family: str = Field("qwen_image", description="backbone family: qwen_image or sana")
    preset: str | None = Field(
        None, description="a named random-init size, e.g. tiny-28g (see docs/models.md)"
    )
    pretrained_path: str | None = Field(
        None, description="a diffusers pipeline dir (with transformer/) or a transformer dir"
    )
    vae_path: str | None = Field(
        None, description="a diffusers VAE dir (or pipeline dir with vae/): train in its latent space"
    )
    image_size: int | None = Field(None, ge=4, description="pixel height = width; default from the preset")
    channels: int | None = Field(
        None, ge=1, description="pixel channels; default from the preset (3 with a VAE)"
    )
    patch: int | None = Field(
        None, ge=1, description="patch size override for presets (tokens = (size/patch)^2)"
    )
    e2_init: Literal["copy", "random"] = Field(
        "copy", description="second time embedder: copy of E1 (r = t is exactly the base) or small random"
    )
    fake_branch: Literal["signed", "mirror"] = Field(
        "signed",
        description=(
            "how the negative-time (fake) branch starts: 'signed' feeds the signed t to the "
            "time embedder (the reference); 'mirror' feeds |t| plus a zero-initialised "
            "sign embedding, so the fake branch starts equal to the real one"
        ),
    )
    text_max_length: int = Field(32, ge=2, le=512, description="caption tokens (padded/truncated)")
    backbone: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the preset's diffusers config, e.g. {num_layers: 4}"
    )
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        check_family(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if (self.preset is None) == (self.pretrained_path is None):
            raise ValueError("set exactly one of model.preset (random init) or model.pretrained_path")
        if self.preset is not None:
            get_preset(self.family, self.preset)
        else:
            if self.patch is not None:
                raise ValueError(
                    "patch applies to presets only; a pretrained backbone fixes its own patch size"
                )
            if self.backbone:
                raise ValueError(
                    "backbone overrides apply to presets only; a pretrained backbone fixes its config"
                )
        if self.vae_path is None and self.pretrained_path is not None and self.image_size is None:
            raise ValueError("a pretrained backbone in pixel space needs model.image_size")
        if self.vae_path is not None and self.image_size is None and self.preset is None:
            raise ValueError("a latent-space model needs model.image_size (pixels)")
        if self.vae_path is not None and self.channels not in (None, 3):
            raise ValueError(f"with a VAE the pixel images are RGB: channels must be 3 (got {self.channels})")
        size, patch = self.image_size, self.patch
        if self.preset is not None:
            p = get_preset(self.family, self.preset)
            size = size or p.image_size
            patch = patch or p.patch
        if self.vae_path is None and size is not None and patch is not None and size % patch:
            raise ValueError(f"image_size {size} is not divisible by patch {patch}")
        return self

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None
