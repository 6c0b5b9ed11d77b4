"""A diffusers VAE as a frozen codec between images in [-1, 1] and normalised latents.

Normalisation follows each pipeline: per-channel `latents_mean/std` when the VAE config has them
(Qwen-Image), else `(z - shift_factor) * scaling_factor` (SD/SANA). Qwen-Image's VAE is a video VAE
taking (B, C, T, H, W): a single frame is added and removed here so callers always see 4-D tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinflow.models.fetch import local_model_dir


def vae_dir(path: str | Path) -> Path:
    """A pipeline directory's `vae/` subfolder, or the directory itself (s3://: cached)."""
    root = local_model_dir(path)
    if (root / "vae" / "config.json").is_file():
        return root / "vae"
    if (root / "config.json").is_file():
        return root
    raise FileNotFoundError(f"{root}: no diffusers VAE here (expected config.json or vae/config.json)")


SUPPORTED_VAES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderDC")


def _check_class(name: str) -> None:
    if name not in SUPPORTED_VAES:
        raise ValueError(f"unsupported VAE class {name!r}; supported: {', '.join(SUPPORTED_VAES)}")


def _compression(cfg: dict[str, Any]) -> int:
    cls = cfg.get("_class_name", "")
    _check_class(cls)
    if cls == "AutoencoderKLQwenImage":
        return 2 ** len(cfg.get("temperal_downsample", [False, True, True]))
    if cls == "AutoencoderDC":
        return 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
    return 2 ** (len(cfg.get("block_out_channels", [64])) - 1)


def vae_geometry(path: str | Path) -> tuple[int, int, int]:
    """(pixel channels, latent channels, spatial compression) from the config alone (no weights)."""
    cfg = json.loads((vae_dir(path) / "config.json").read_text())
    factor = _compression(cfg)
    if cfg.get("_class_name") == "AutoencoderKLQwenImage":
        return int(cfg.get("input_channels", 3)), int(cfg.get("z_dim", 16)), factor
    return int(cfg.get("in_channels", 3)), int(cfg.get("latent_channels", 4)), factor


class LatentCodec(nn.Module):
    """encode: images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f); decode: the inverse."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = dict(vae.config)
        cfg["_class_name"] = type(vae).__name__
        self.factor = _compression(cfg)
        self.is_video = type(vae).__name__ == "AutoencoderKLQwenImage"
        self.latent_channels = int(cfg.get("z_dim") if self.is_video else cfg.get("latent_channels", 4))
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            if m.shape[1] != self.latent_channels or s.shape[1] != self.latent_channels:
                raise ValueError(
                    f"VAE latents_mean/std have {m.shape[1]}/{s.shape[1]} entries, "
                    f"expected {self.latent_channels}"
                )
            self.register_buffer("shift", m, persistent=False)
            self.register_buffer("scale", 1.0 / s, persistent=False)
        else:
            shift = float(cfg.get("shift_factor") or 0.0)
            self.register_buffer("shift", torch.full((1, 1, 1, 1), shift), persistent=False)
            self.register_buffer(
                "scale", torch.full((1, 1, 1, 1), float(cfg.get("scaling_factor", 1.0))), persistent=False
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> LatentCodec:
        import diffusers  # seconds to import: config-only readers (vae_geometry) never need it

        root = vae_dir(path)
        name = json.loads((root / "config.json").read_text()).get("_class_name", "")
        _check_class(name)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        return cls(getattr(diffusers, name).from_pretrained(str(root), **kwargs))

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(
                f"encode expects (B, C, H, W) images in [-1, 1], got shape {tuple(images.shape)}"
            )
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} must be divisible by the VAE factor {self.factor}"
            )
        dtype = next(self.vae.parameters()).dtype
        x = images.to(dtype)
        if self.is_video:
            x = x.unsqueeze(2)
        out = self.vae.encode(x)
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            z = dist.sample(generator) if sample else dist.mode()
        else:
            z = out.latent
        if self.is_video:
            z = z.squeeze(2)
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects (B, {self.latent_channels}, h, w) latents, got {tuple(latents.shape)}"
            )
        dtype = next(self.vae.parameters()).dtype
        z = (latents.float() / self.scale + self.shift).to(dtype)
        if self.is_video:
            z = z.unsqueeze(2)
        x = self.vae.decode(z, return_dict=False)[0]
        if self.is_video:
            x = x.squeeze(2)
        return x.float().clamp(-1, 1)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.vae.save_pretrained(str(out_dir), safe_serialization=True)


def load_codec(path: str | Path | None) -> LatentCodec | None:
    return None if path is None else LatentCodec.from_pretrained(path)
