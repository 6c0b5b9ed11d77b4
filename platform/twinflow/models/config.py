"""The job YAML's `model:` section. Validation here is pure (no diffusers import, no file access);
`build_generator` checks what needs files (pretrained configs, VAE geometry) with equally clear errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from twinflow.config import StrictModel
from twinflow.models.null_prompts import default_null_prompt
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
    text_max_length: int = Field(
        32, ge=2, le=1024, description="caption tokens (padded/truncated; after the template for qwen2.5-vl)"
    )
    text_encoder: Literal["minilm", "qwen2.5-vl"] = Field(
        "minilm",
        description=(
            "caption encoder: minilm (384-d, through a learned projection; the small presets' "
            "default) or qwen2.5-vl (Qwen-Image's own, states enter the backbone unprojected)"
        ),
    )
    text_encoder_path: str | None = Field(
        None,
        description="qwen2.5-vl only: a Qwen-Image pipeline dir with text_encoder/ and tokenizer/ "
        "(local or s3://); default pretrained_path",
    )
    null_prompt: str | None = Field(
        None,
        description=(
            "the caption whose encoding is the CFG null condition (training's condition dropout and "
            "baked-in CFG, and every sampler with guidance); default: the reference's "
            "'Generate an image.' with qwen2.5-vl, the empty caption with minilm"
        ),
    )
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
        if self.text_encoder == "qwen2.5-vl":
            if self.family != "qwen_image":
                raise ValueError(f"text_encoder qwen2.5-vl is Qwen-Image's; model.family is {self.family!r}")
            if self.text_encoder_path is None and self.pretrained_path is None:
                raise ValueError(
                    "text_encoder qwen2.5-vl needs model.text_encoder_path or model.pretrained_path "
                    "(a Qwen-Image pipeline dir with text_encoder/ and tokenizer/)"
                )
        elif self.text_max_length > 512:
            raise ValueError(f"text_max_length {self.text_max_length} exceeds MiniLM's 512 positions")
        elif self.text_encoder_path is not None:
            raise ValueError("model.text_encoder_path applies to text_encoder: qwen2.5-vl only")
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
    def text_encoder_spec(self) -> dict[str, Any]:
        """What `open_text_encoder` needs: kind, path (None: MiniLM's wheel), max_length, null_prompt."""
        path = None
        if self.text_encoder == "qwen2.5-vl":
            path = self.text_encoder_path or self.pretrained_path
        return {
            "kind": self.text_encoder,
            "path": path,
            "max_length": self.text_max_length,
            "null_prompt": self.resolved_null_prompt,
        }

    @property
    def resolved_null_prompt(self) -> str:
        """`null_prompt`, or the text encoder's default when the job names none."""
        if self.null_prompt is not None:
            return self.null_prompt
        return default_null_prompt(self.text_encoder)

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None
