"""TwinFlowGenerator: a diffusers transformer behind the velocity-model contract G(x, t, r, cond).

It owns the backbone (whose timestep embedder gained E2), the learned projection from the 384-d
caption states to the backbone's text width, and the family's packing of the state into tokens.
t and r are signed, in [-1, 1], shape (B,); the output is the average velocity over [r, t] with x's
shape and dtype.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from twinflow.models.config import ModelConfig
from twinflow.models.export_layout import load_extras, load_twin_e2, read_metadata
from twinflow.models.fetch import local_model_dir
from twinflow.models.lora import apply_lora
from twinflow.models.presets import get_preset
from twinflow.models.qwen_text import encoder_width, resolve_encoder_path
from twinflow.models.registry import Family, family_of, get_family, transformer_dir
from twinflow.models.text_encoder import TEXT_DIM, export_text_encoder_spec
from twinflow.models.time_embed import E2Init, FakeBranch, install_two_time, pack_times
from twinflow.models.vae import vae_geometry

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


class TwinFlowGenerator(nn.Module):
    """G(x, t, r, cond) -> velocity. Installs E2 into `backbone`'s timestep embedder on construction."""

    def __init__(
        self,
        family: Family | str,
        backbone: nn.Module,
        *,
        sample_size: int,
        text_dim: int = TEXT_DIM,
        e2_init: E2Init = "copy",
        text_max_length: int = 32,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        fake_branch: FakeBranch = "signed",
        text_projection: bool = True,
    ) -> None:
        super().__init__()
        fam = get_family(family) if isinstance(family, str) else family
        self.family = fam
        self.backbone = backbone
        e1, twin_cls = fam.time_embedder(backbone)
        width = [m.out_features for m in e1.modules() if isinstance(m, nn.Linear)][-1]
        install_two_time(
            e1,
            twin_cls,
            e2_init=e2_init,
            time_scale=fam.time_scale(backbone),
            fake_branch=fake_branch,
            width=width,
        )
        self.fake_branch = fake_branch
        if text_projection:
            self.text_proj: nn.Module = nn.Linear(text_dim, fam.text_dim(backbone))
        elif text_dim != fam.text_dim(backbone):
            raise ValueError(
                f"the text encoder gives {text_dim}-d states but the backbone takes "
                f"{fam.text_dim(backbone)}-d ones (joint_attention_dim); without a projection they must match"
            )
        else:  # the backbone's own text encoder: its states enter unchanged, as in its pipeline
            self.text_proj = nn.Identity()
        self.channels = fam.channels(backbone)
        self.patch = fam.patch(backbone)
        self.time_scale = fam.time_scale(backbone)
        if sample_size % self.patch:
            raise ValueError(
                f"sample size {sample_size} is not divisible by the backbone's patch size {self.patch}"
            )
        self.sample_size = int(sample_size)
        self.text_dim = int(text_dim)
        self.text_max_length = int(text_max_length)
        self.text_encoder = text_encoder
        #: what `open_text_encoder` needs to rebuild the caption encoder (recorded in exports)
        self.text_encoder_spec: dict[str, Any] = {
            "kind": "minilm",
            "path": None,
            "max_length": text_max_length,
            "null_prompt": "",
        }
        self.e2_init = e2_init
        #: set by build_generator / load_generator; recorded in exports.
        self.model_config: ModelConfig | None = None
        self.latent: dict[str, Any] | None = None  # {"vae_path", "factor", "channels"} in latent space
        self.image_size = self.sample_size  # pixels (differs from sample_size in latent space)
        self.pixel_channels = self.channels

    @classmethod
    def from_export(
        cls, path: str | Path, torch_dtype: torch.dtype | None = None
    ) -> tuple[TwinFlowGenerator, dict[str, Any]]:
        """(generator in eval mode, metadata) from a `save_generator` directory; outputs match the saved
        model. (`twinflow.models.export_loader.load_generator`; here so the class needs nothing from export.)"""
        path = Path(path)
        meta = read_metadata(path)
        family = get_family(meta["family"])
        backbone = family.load_backbone(path / "transformer", torch_dtype=torch_dtype)
        text = meta["text_encoder"]
        gen = cls(
            family,
            backbone,
            sample_size=int(meta["sample_shape"][1]),
            text_dim=int(meta["text_dim"]),
            e2_init="copy",
            text_max_length=int(text["max_length"]),
            text_encoder=text["name"],
            fake_branch=meta.get("fake_branch", "signed"),
            text_projection=text.get("kind", "minilm") == "minilm",
        )
        gen.text_encoder_spec = export_text_encoder_spec(path, meta)
        load_twin_e2(gen.backbone, path / "transformer", required=True)
        load_extras(gen, path, required=True)
        if torch_dtype is not None:
            gen.text_proj.to(torch_dtype)
        gen.e2_init = meta.get("e2_init", "copy")
        gen.image_size = int(meta["image_size"])
        gen.pixel_channels = int(meta["pixel_channels"])
        gen.latent = meta.get("latent")
        if meta.get("model_config") is not None:
            gen.model_config = ModelConfig.model_validate(meta["model_config"])
        return gen.eval(), meta

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        image_size: int | None = None,
        vae_path: str | None = None,
        **model_fields: Any,
    ) -> TwinFlowGenerator:
        """One of our exports (exactly as saved), or a diffusers pipeline/transformer directory.

        For a plain diffusers directory the family comes from its config's class name; `image_size`
        (pixels) defaults to SANA's `sample_size` (times the VAE factor); other ModelConfig fields
        (e2_init, lora, text_max_length, ...) pass through.
        """
        root = Path(path)
        if (
            (root / "twinflow.json").is_file()
            and not model_fields
            and image_size is None
            and vae_path is None
        ):
            return cls.from_export(root)[0]
        family = family_of(root)
        if image_size is None:
            sample = json.loads((transformer_dir(root) / "config.json").read_text()).get("sample_size")
            if sample is None:
                raise ValueError(f"{root}: pass image_size (pixels); the backbone config does not fix one")
            factor = 1
            if vae_path is not None:
                factor = vae_geometry(vae_path)[2]
            image_size = int(sample) * factor
        cfg = ModelConfig(
            family=family, pretrained_path=str(root), vae_path=vae_path, image_size=image_size, **model_fields
        )
        return build_generator(cfg)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the state this model generates (pixels, or latents with a VAE)."""
        return (self.channels, self.sample_size, self.sample_size)

    def extra_repr(self) -> str:
        return (
            f"family={self.family.name}, sample_shape={self.sample_shape}, patch={self.patch}, "
            f"text_dim={self.text_dim}"
        )

    def _batch_times(self, v: torch.Tensor | float, b: int, name: str, device: torch.device) -> torch.Tensor:
        v = torch.as_tensor(v, dtype=torch.float32, device=device)
        if v.ndim == 0 or (v.ndim == 1 and v.shape[0] == 1):
            return v.reshape(1).expand(b)
        if v.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},) to match x, got {tuple(v.shape)}")
        return v.float()

    def _text(
        self, cond: Mapping[str, torch.Tensor], b: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states = cond.get("text_states")
        if states is None:
            # Unconditional use: one constant token (the projection's bias) keeps every backbone happy.
            states = torch.zeros(b, 1, self.text_dim, device=device)
            mask = torch.ones(b, 1, dtype=torch.int64, device=device)
        else:
            if states.ndim != 3 or states.shape[-1] != self.text_dim:
                raise ValueError(
                    f"cond['text_states'] must be (B, L, {self.text_dim}), got {tuple(states.shape)}"
                )
            mask = cond.get("text_mask")
            if mask is None:
                mask = torch.ones(states.shape[:2], dtype=torch.int64, device=states.device)
            if mask.shape != states.shape[:2]:
                raise ValueError(
                    f"cond['text_mask'] {tuple(mask.shape)} must match text_states {tuple(states.shape[:2])}"
                )
            if states.shape[0] == 1 and b > 1:  # the CFG null condition comes with batch 1
                states, mask = states.expand(b, -1, -1), mask.expand(b, -1)
            elif states.shape[0] != b:
                raise ValueError(f"cond['text_states'] has batch {states.shape[0]}, x has {b}")
        return self.text_proj(states.to(device=device, dtype=dtype)), mask.to(device)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        r: torch.Tensor | float,
        cond: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"x has {c} channels, the model expects {self.channels}")
        if h % self.patch or w % self.patch:
            raise ValueError(f"x is {h}x{w}, not divisible by the patch size {self.patch}")
        cond = cond or {}
        dtype = self.text_proj.weight.dtype if isinstance(self.text_proj, nn.Linear) else self.backbone.dtype
        t = self._batch_times(t, b, "t", x.device)
        r = self._batch_times(r, b, "r", x.device)
        text, mask = self._text(cond, b, x.device, dtype)
        ref = cond.get("ref_image")
        if ref is not None:
            if ref.ndim != 4 or ref.shape[1] != c or ref.shape[-2] % self.patch or ref.shape[-1] % self.patch:
                raise ValueError(
                    f"cond['ref_image'] must be (B, {c}, H', W') with sides divisible by "
                    f"{self.patch}, got {tuple(ref.shape)}"
                )
            if ref.shape[0] == 1 and b > 1:
                ref = ref.expand(b, -1, -1, -1)
            elif ref.shape[0] != b:
                raise ValueError(f"cond['ref_image'] has batch {ref.shape[0]}, x has {b}")
            ref = ref.to(dtype)
        out = self.family.forward(
            self.backbone, x.to(dtype), pack_times(t, r, self.time_scale), text, mask, ref
        )
        return out.to(x.dtype)


def _state_geometry(cfg: ModelConfig, preset_size: int | None, preset_channels: int | None) -> dict[str, Any]:
    """Pixel and state (pixel or latent) geometry for a config."""
    image_size = cfg.image_size or preset_size
    if cfg.vae_path is None:
        channels = cfg.channels or preset_channels
        return {
            "image_size": image_size,
            "pixel_channels": channels,
            "state_size": image_size,
            "state_channels": channels,
            "latent": None,
        }
    pix, lat, factor = vae_geometry(cfg.vae_path)
    if image_size % factor:
        raise ValueError(
            f"model.image_size {image_size} is not divisible by the VAE's downsampling factor {factor}"
        )
    return {
        "image_size": image_size,
        "pixel_channels": pix,
        "state_size": image_size // factor,
        "state_channels": lat,
        "latent": {"vae_path": str(cfg.vae_path), "factor": factor, "channels": lat},
    }


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """New floating tensors (module weights) in `dtype` inside the block; None: unchanged."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_generator(cfg: ModelConfig, dtype: torch.dtype | None = None) -> TwinFlowGenerator:
    """A generator from the job's `model:` section (random-init preset or pretrained diffusers weights).

    `dtype` (the training precision): every weight is made or loaded in it directly, so a 20B bf16
    model never exists in fp32 first (41 GB instead of 82 GB on the way to an 80 GB GPU)."""
    with default_dtype(dtype):
        return _build_generator(cfg, dtype)


def _build_generator(cfg: ModelConfig, dtype: torch.dtype | None) -> TwinFlowGenerator:
    family = get_family(cfg.family)
    text_dim, text_projection, text_name, text_spec = _text_input(cfg)
    if cfg.preset is not None:
        preset = get_preset(cfg.family, cfg.preset)
        geo = _state_geometry(cfg, preset.image_size, preset.channels)
        patch = cfg.patch or preset.patch
        if geo["state_size"] % patch:
            raise ValueError(f"state size {geo['state_size']} is not divisible by patch {patch}")
        config = {
            **family.preset_config(preset, geo["state_channels"], patch, geo["state_size"]),
            **({} if text_projection else {"joint_attention_dim": text_dim}),
            **cfg.backbone,
        }
        backbone = family.build_backbone(config)
    else:
        geo = _state_geometry(cfg, None, None)
        backbone = family.load_backbone(cfg.pretrained_path, torch_dtype=dtype)
        have = family.channels(backbone)
        if have != geo["state_channels"]:
            space = "latent" if cfg.vae_path else "pixel"
            raise ValueError(
                f"{cfg.pretrained_path}: the backbone models {have} channels but the {space} "
                f"state has {geo['state_channels']}"
            )
    gen = TwinFlowGenerator(
        family,
        backbone,
        sample_size=geo["state_size"],
        e2_init=cfg.e2_init,
        text_max_length=cfg.text_max_length,
        fake_branch=cfg.fake_branch,
        text_dim=text_dim,
        text_projection=text_projection,
        text_encoder=text_name,
    )
    gen.text_encoder_spec = text_spec
    if cfg.pretrained_path is not None:
        _adopt_twinflow_export(gen, cfg.pretrained_path)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    gen.model_config = cfg
    gen.latent = geo["latent"]
    gen.image_size = geo["image_size"]
    gen.pixel_channels = geo["pixel_channels"]
    if cfg.lora is not None:
        apply_lora(gen, cfg.lora)
    return gen


def _text_input(cfg: ModelConfig) -> tuple[int, bool, str, dict[str, Any]]:
    """(state width, whether a learned projection precedes the backbone, encoder name, encoder spec)."""
    spec = cfg.text_encoder_spec
    if cfg.text_encoder == "minilm":
        return TEXT_DIM, True, DEFAULT_TEXT_ENCODER, spec
    path = resolve_encoder_path(spec["path"])
    name = f"qwen2.5-vl:{Path(path.rstrip('/')).name}"
    return encoder_width(path), False, name, {**spec, "path": path}


def _adopt_twinflow_export(gen: TwinFlowGenerator, path: str | Path) -> None:
    """Fine-tuning from one of our exports keeps its trained E2 and text projection."""
    load_twin_e2(gen.backbone, transformer_dir(path), required=False)
    root = local_model_dir(path)
    if (root / "transformer").is_dir():
        load_extras(gen, root, required=False)
