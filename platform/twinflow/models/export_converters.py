"""Exports other tools load: a QwenImagePipeline directory, and LoRA files for diffusers and ComfyUI.

What a diffusers pipeline can do with a TwinFlow model: its transformer call passes a plain (B,)
timestep, which runs E1 alone, so it evaluates G(x, t, t), the instantaneous velocity. With the
Euler scheduler written here (no shift) `num_inference_steps=N` is exactly our multistep sampler
("mul", rho = 0, uniform grid of N steps). It cannot take TwinFlow's any-step jumps (r < t, the
1-4 NFE samplers): those need E2, which diffusers does not load. E2 is kept beside the diffusers
weights (`transformer/twinflow_e2.safetensors`), so the same directory is also a full TwinFlow
export that `load_generator` reads exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from safetensors.torch import load_file, save_file

from twinflow.models.export_formats import FORMATS
from twinflow.models.export_layout import RESERVED_KEYS, read_metadata
from twinflow.models.export_loader import load_export_codec, load_generator
from twinflow.models.export_writer import save_generator
from twinflow.models.lora import has_lora, lora_state_dict
from twinflow.models.qwen_text import encoder_dirs
from twinflow.models.time_embed import E2_PREFIX
from twinflow.models.vae import vae_dir

E2_FILE = "twinflow_e2.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_FILE = "comfyui_lora.safetensors"
PIPELINE_CLASSES = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def check_pipeline_ready(generator: Any, what: str) -> None:
    """A diffusers/ComfyUI Qwen-Image export needs the family, its own text encoder and its VAE."""
    if generator.family.name != "qwen_image":
        raise ValueError(
            f"{what}: only qwen_image models load into QwenImagePipeline (this is {generator.family.name})"
        )
    if generator.text_encoder_spec["kind"] != "qwen2.5-vl":
        raise ValueError(
            f"{what}: the model reads {generator.text_encoder_spec['kind']} caption states through a learned "
            "projection that QwenImagePipeline cannot run; train with model.text_encoder: qwen2.5-vl"
        )
    if generator.latent is None:
        raise ValueError(f"{what}: a pixel-space model has no VAE; QwenImagePipeline works in latent space")


@contextmanager
def _without_e2(generator: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Detach E2 from its embedder for the duration (so save_pretrained writes diffusers keys only);
    yields E2's tensors under their full backbone names."""
    e1, _ = generator.family.time_embedder(generator.backbone)
    prefix = next(n for n, m in generator.backbone.named_modules() if m is e1)
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in generator.backbone.state_dict().items()
        if k.startswith(f"{prefix}.{E2_PREFIX}.")
    }
    e2 = e1._modules.pop(E2_PREFIX)
    try:
        yield tensors
    finally:
        e1._modules[E2_PREFIX] = e2


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory, hard-linking files where the filesystem allows (a 7B encoder is 16 GB)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def scheduler_config() -> dict[str, Any]:
    """Plain Euler on the pipeline's default sigmas linspace(1, 1/N, N): our uniform multistep grid."""
    return dict(FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False).config)


def save_diffusers_pipeline(
    generator: Any,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    codec: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A directory `QwenImagePipeline.from_pretrained` loads, which is also a full TwinFlow export.

    The text encoder and tokenizer come from the model's Qwen-Image pipeline directory (hard links
    when possible); the VAE from `codec` or the model's `vae_path`.
    """
    check_pipeline_ready(generator, "diffusers export")
    enc_dir, tok_dir = encoder_dirs(generator.text_encoder_spec["path"])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staged = work / "export"
        with _without_e2(generator) as e2:
            save_generator(generator, staged, metadata, codec=codec, dtype=dtype)
        e2 = {k: v.to(dtype) if dtype is not None else v for k, v in e2.items()}
        save_file(e2, str(staged / "transformer" / E2_FILE))
        _link_tree(enc_dir, staged / "text_encoder")
        _link_tree(tok_dir, staged / "tokenizer")
        if not (staged / "vae").is_dir():
            _link_tree(vae_dir(generator.latent["vae_path"]), staged / "vae")
        FlowMatchEulerDiscreteScheduler.from_config(scheduler_config()).save_pretrained(
            str(staged / "scheduler")
        )
        index = {
            "_class_name": "QwenImagePipeline",
            "_diffusers_version": diffusers.__version__,
            **PIPELINE_CLASSES,
        }
        (staged / "model_index.json").write_text(json.dumps(index, indent=2))
        meta_file = staged / "twinflow.json"
        meta = json.loads(meta_file.read_text())
        meta["latent"]["vae_dir"] = "vae"
        meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def check_pipeline_meta(meta: dict[str, Any], what: str) -> None:
    """`check_pipeline_ready` for an export's metadata (no weights loaded)."""
    if meta["family"] != "qwen_image":
        raise ValueError(
            f"{what}: only qwen_image models load into QwenImagePipeline (this is {meta['family']})"
        )
    kind = meta["text_encoder"].get("kind", "minilm")
    if kind != "qwen2.5-vl":
        raise ValueError(
            f"{what}: the model reads {kind} caption states through a learned projection that "
            "QwenImagePipeline cannot run; train with model.text_encoder: qwen2.5-vl"
        )


def adapter_of(generator: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(peft state dict, peft LoRA config as plain JSON data) of a live generator with LoRA."""
    check_pipeline_ready(generator, "LoRA export")
    if not has_lora(generator):
        raise ValueError("LoRA export: this model has no LoRA adapters (set model.lora)")
    sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(generator).items()}
    return sd, _plain(generator.backbone.peft_config["default"].to_dict())


def adapter_of_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The same from an export's `lora/` (what `save_generator` writes beside the merged weights)."""
    meta = read_metadata(path)
    check_pipeline_meta(meta, "LoRA export")
    lora = Path(path) / ((meta.get("lora") or {}).get("adapter_dir") or "lora")
    if not (lora / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapter in this export (trained without model.lora?)")
    return load_file(str(lora / "adapter_model.safetensors")), json.loads(
        (lora / "adapter_config.json").read_text()
    )


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    config = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}
    return json.loads(json.dumps(config, default=str))


def save_diffusers_lora(adapter: tuple[dict[str, torch.Tensor], dict[str, Any]], out_dir: str | Path) -> Path:
    """`pipeline.load_lora_weights(out_dir)` format: peft keys under `transformer.`, with rank/alpha."""
    sd, config = adapter
    config = {**config, "exclude_modules": None}  # E2's exclusion means nothing to a plain backbone
    QwenImagePipeline.save_lora_weights(
        str(out_dir),
        transformer_lora_layers=sd,
        weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=config,
    )
    return Path(out_dir) / LORA_FILE


def comfyui_lora_state_dict(
    adapter: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image LoRA keys: `diffusion_model.<module>.lora_A/lora_B.weight` and `.alpha`
    (ComfyUI, like diffusers' converter for this format, scales by alpha / rank)."""
    sd, config = adapter
    alphas = config.get("alpha_pattern") or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        out[f"diffusion_model.{key}"] = value
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(
                float(alphas.get(module, config["lora_alpha"]))
            )
    return out


def save_comfyui_lora(adapter: tuple[dict[str, torch.Tensor], dict[str, Any]], out_file: str | Path) -> Path:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(comfyui_lora_state_dict(adapter), str(out_file), metadata={"format": "comfyui-qwen-image-lora"})
    return out_file


def check_formats(formats: list[str]) -> list[str]:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; known: {', '.join(FORMATS)}")
    return list(formats)


def check_replaceable(target: Path, fmt: str) -> None:
    """`twinflow export --out` replaces `<out>/diffusers` whole and writes files into the other formats'
    folders: refuse a symlink, a file, or a diffusers folder that is not one of our pipeline exports."""
    if target.is_symlink():
        raise ValueError(
            f"--out: {target} is a symlink (to {target.resolve()}); refusing to write through it"
        )
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"--out: {target} exists and is not a directory; refusing to replace it")
    if fmt == "diffusers" and any(target.iterdir()):
        if not ((target / "model_index.json").is_file() and (target / "twinflow.json").is_file()):
            raise ValueError(
                f"--out: {target} holds no model_index.json + twinflow.json, so it is not a diffusers "
                "export of ours; refusing to replace it (move it away or pick another --out)"
            )


def convert_export(path: str | Path, formats: list[str], out_dir: str | Path) -> dict[str, Path]:
    """Write each format of a native export under `out_dir/<format>` (what `twinflow export` runs)."""
    meta = read_metadata(path)
    check_pipeline_meta(meta, f"{path}")
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    formats = check_formats(formats)
    for fmt in formats:  # all checked before anything is written
        check_replaceable(out_dir / fmt, fmt)
    for fmt in formats:
        target = out_dir / fmt
        if fmt == "diffusers":
            generator, _ = load_generator(path)
            user_meta = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
            written[fmt] = save_diffusers_pipeline(
                generator, target, user_meta, codec=load_export_codec(path)
            )
        elif fmt == "diffusers_lora":
            written[fmt] = save_diffusers_lora(adapter_of_export(path), target)
        else:
            written[fmt] = save_comfyui_lora(adapter_of_export(path), target / COMFY_FILE)
    return written
