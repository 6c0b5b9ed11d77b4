"""The export folder's own files: names, metadata, and the weights that live outside diffusers' own loading.

E2 is saved inside `transformer/` (under `*.twin_e2.*` keys, which plain diffusers ignores), so after
`from_pretrained` has loaded E1 and the rest, E2 is read back here from the same safetensors files
(sharded or not). The text projection goes to `twinflow_extra.safetensors` beside `transformer/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from twinflow.models.time_embed import E2_PREFIX, SIGN_NAME

EXTRA_FILE = "twinflow_extra.safetensors"
META_FILE = "twinflow.json"
FORMAT_VERSION = 1
# Metadata keys the writer owns; a caller's own metadata may not use them.
RESERVED_KEYS = (
    "format_version",
    "family",
    "backbone_class",
    "sample_shape",
    "patch",
    "time_scale",
    "text_dim",
    "text_encoder",
    "image_size",
    "pixel_channels",
    "latent",
    "model_config",
    "lora",
    "e2_init",
    "fake_branch",
)
_EXTRA_MODULES = ("text_proj",)


def _tensors_with(directory: Path, marker: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if marker in f".{key}":
                    out[key] = fh.get_tensor(key)
    return out


def load_twin_e2(backbone: nn.Module, directory: str | Path, required: bool = True) -> int:
    """Load every `*.twin_e2.*` tensor found in `directory` into `backbone`; returns how many."""
    directory = Path(directory)
    found = _tensors_with(directory, f".{E2_PREFIX}.")
    expected = {k for k in backbone.state_dict() if f".{E2_PREFIX}." in f".{k}"}
    if not any(f".{SIGN_NAME}." in k for k in found):
        # weights of a "signed" model into a "mirror" one: the sign embedding keeps its zero gate
        expected = {k for k in expected if f".{SIGN_NAME}." not in k}
    if not found:
        if required:
            raise FileNotFoundError(
                f"{directory}: no second-time-embedder weights ({E2_PREFIX}.*) in the safetensors"
            )
        return 0
    if set(found) != expected:
        missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
        raise ValueError(
            f"{directory}: E2 weights do not match the backbone (missing {missing[:4]}, "
            f"unexpected {extra[:4]})"
        )
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for k, v in found.items():
            params[k].copy_(v.to(params[k].dtype))
    return len(found)


def save_extras(
    generator: nn.Module, out_dir: str | Path, info: dict[str, str], dtype: torch.dtype | None
) -> Path:
    tensors = {}
    for mod in _EXTRA_MODULES:
        for k, v in getattr(generator, mod).state_dict().items():
            v = v.detach().cpu()
            tensors[f"{mod}.{k}"] = (
                v.to(dtype) if dtype is not None and v.is_floating_point() else v
            ).contiguous()
    path = Path(out_dir) / EXTRA_FILE
    save_file(tensors, str(path), metadata={k: str(v) for k, v in info.items()})
    return path


def load_extras(generator: nn.Module, directory: str | Path, required: bool = True) -> bool:
    path = Path(directory) / EXTRA_FILE
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing (text projection weights)")
        return False
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for mod in _EXTRA_MODULES:
        module = getattr(generator, mod)
        part = {k[len(mod) + 1 :]: v for k, v in tensors.items() if k.startswith(mod + ".")}
        want = module.state_dict()
        if set(part) != set(want) or any(part[k].shape != want[k].shape for k in want):
            raise ValueError(
                f"{path}: {mod} weights do not fit this generator "
                f"(saved {[(k, tuple(v.shape)) for k, v in part.items()]}, "
                f"expected {[(k, tuple(v.shape)) for k, v in want.items()]})"
            )
        module.load_state_dict({k: v.to(want[k].dtype) for k, v in part.items()})
    return True


def check_metadata(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """`meta` when it is a twinflow.json this code reads, else a ValueError naming `where`."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The twinflow.json of a local export folder."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a TwinFlow export (no {META_FILE})")
    return check_metadata(json.loads(f.read_text()), str(f))
