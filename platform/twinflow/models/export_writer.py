"""Write a generator as an export: a diffusers-format directory that `export_loader` reads back exactly.

Layout of `out_dir`:

    twinflow.json                  what to rebuild (family, geometry, text encoder, config) + caller metadata
    transformer/                   backbone via save_pretrained (safetensors); E2 under `*.twin_e2.*` keys,
                                   which plain diffusers ignores (it then loads the base velocity model)
    twinflow_extra.safetensors     text projection (its safetensors metadata repeats the packing info)
    lora/                          with LoRA: the adapter alone (peft format); transformer/ holds it merged
    vae/                           when a codec is given: the VAE via save_pretrained

Parameters must be whole on this process (after ZeRO-3, gather first or load the consolidated state
dict into a fresh `build_generator` result).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from twinflow.atomic_files import usual_modes
from twinflow.models.export_layout import FORMAT_VERSION, META_FILE, RESERVED_KEYS, save_extras
from twinflow.models.generator import TwinFlowGenerator
from twinflow.models.lora import has_lora, lora_state_dict, merged_copy


def _json_default(v: Any) -> Any:
    if isinstance(v, (Path, torch.dtype)):
        return str(v)
    if isinstance(v, (tuple, set, frozenset)):
        return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
    raise TypeError(f"metadata value {v!r} ({type(v).__name__}) is not JSON serialisable")


def check_finite(generator: torch.nn.Module) -> None:
    """Refuse to export NaN/Inf weights (a corrupted restore or a diverged run makes black images)."""
    bad = [
        name
        for name, t in generator.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(
            f"refusing to export: {len(bad)} tensor(s) hold NaN or Inf values, first: {', '.join(bad[:5])}"
        )


def save_generator(
    generator: TwinFlowGenerator,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    codec: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the export (see module docstring); replaces `out_dir` atomically when it is local."""
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"save_generator: metadata keys {clash} are written by the exporter itself")
    check_finite(generator)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lora_info = None
        model = generator
        if has_lora(generator):
            lora_dir = tmp / "lora"
            lora_dir.mkdir()
            sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(generator).items()}
            save_file(sd, str(lora_dir / "adapter_model.safetensors"))
            peft_cfg = generator.backbone.peft_config["default"]
            (lora_dir / "adapter_config.json").write_text(
                json.dumps(peft_cfg.to_dict(), indent=2, default=_json_default, sort_keys=True)
            )
            lora_info = {
                "merged": True,
                "rank": peft_cfg.r,
                "alpha": peft_cfg.lora_alpha,
                "target_modules": (
                    peft_cfg.target_modules
                    if isinstance(peft_cfg.target_modules, str)
                    else sorted(peft_cfg.target_modules)
                ),
                "adapter_dir": "lora",
            }
            model = merged_copy(generator)
        backbone = model.backbone
        if dtype is not None:
            backbone = backbone.to(dtype) if model is not generator else _cast_copy(backbone, dtype)
        backbone.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        info = {
            "family": generator.family.name,
            "patch": generator.patch,
            "channels": generator.channels,
            "sample_size": generator.sample_size,
            "time_scale": generator.time_scale,
            "text_dim": generator.text_dim,
        }
        save_extras(model, tmp, info, dtype)
        if codec is not None:
            codec.save_pretrained(tmp / "vae")
        cfg = generator.model_config
        meta = {
            "format_version": FORMAT_VERSION,
            "family": generator.family.name,
            "backbone_class": type(generator.backbone).__name__,
            "sample_shape": list(generator.sample_shape),
            "patch": generator.patch,
            "time_scale": generator.time_scale,
            "text_dim": generator.text_dim,
            "text_encoder": {
                "name": generator.text_encoder,
                "max_length": generator.text_max_length,
                "dim": generator.text_dim,
                "kind": generator.text_encoder_spec["kind"],
                "path": generator.text_encoder_spec["path"],
                "null_prompt": generator.text_encoder_spec.get("null_prompt", ""),
            },
            "image_size": generator.image_size,
            "pixel_channels": generator.pixel_channels,
            "latent": (
                dict(generator.latent, vae_dir="vae" if codec is not None else None)
                if generator.latent
                else None
            ),
            "model_config": cfg.model_dump(mode="json") if cfg is not None else None,
            "e2_init": generator.e2_init,
            "fake_branch": getattr(generator, "fake_branch", "signed"),
            "lora": lora_info,
            **metadata,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default, sort_keys=True))
        usual_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide the export from the group
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).to(dtype)
