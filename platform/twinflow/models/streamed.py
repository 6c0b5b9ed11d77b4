"""Weights streamed from safetensors one tensor at a time, in each weight's own dtype, into a model
that may be partitioned by DeepSpeed ZeRO-3 (each module gathered alone while it is written): a
start-up never holds a second whole copy of the generator, nor an fp32 copy of a bf16 one."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from twinflow.models.export_layout import EXTRA_FILE
from twinflow.models.time_embed import E2_PREFIX, SIGN_NAME


def safetensors_index(files: list[Path], prefix: str = "") -> dict[str, tuple[Path, str]]:
    """`prefix` + key -> (file, key) over `files`; only the headers are read."""
    index: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            index.update({f"{prefix}{k}": (f, k) for k in fh.keys()})
    return index


def export_index(directory: str | Path) -> dict[str, tuple[Path, str]]:
    """Generator key -> (safetensors file, key in it) of one of our exports: the backbone (and its E2)
    under `transformer/`, the text projection in the extras file. Nothing is read but the headers."""
    directory = Path(directory)
    files = sorted((directory / "transformer").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}/transformer: no safetensors weights")
    index = safetensors_index(files, "backbone.")
    extra = directory / EXTRA_FILE
    if extra.is_file():
        index.update(safetensors_index([extra]))
    return index


def _own_tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor, bool]]:
    """(generator key, tensor, is a parameter) of the module's own parameters and saved buffers."""
    out = [(f"{prefix}{n}", p, True) for n, p in module.named_parameters(recurse=False)]
    persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
    out += [(f"{prefix}{n}", module._buffers[n], False) for n in persistent if module._buffers[n] is not None]
    return out


def load_streamed(model: nn.Module, directory: str | Path, where: str) -> int:
    """Load one of our exports into `model` (see `load_index`). Every key must match, except a "mirror"
    model's sign embedding fine-tuned from a "signed" base (it starts from its zero gate). `where`
    names the source in errors (the job field)."""
    return load_index(model, export_index(directory), where)


def load_backbone_streamed(backbone: nn.Module, transformer_dir: str | Path) -> int:
    """A diffusers transformer directory into a backbone built from its config. Second-time-embedder
    weights in the files (one of our exports) are loaded later, once E2 exists."""
    files = sorted(Path(transformer_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{transformer_dir}: no safetensors weights")
    index = {k: v for k, v in safetensors_index(files).items() if f".{E2_PREFIX}." not in f".{k}"}
    return load_index(backbone, index, str(transformer_dir))


def load_index(model: nn.Module, index: dict[str, tuple[Path, str]], where: str) -> int:
    """Load `index`'s tensors into `model` module by module (gathered one module at a time under
    ZeRO-3, rank 0 writing), each tensor read alone and cast to the weight's own dtype; returns how
    many tensors this rank wrote."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    wanted = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        wanted.update({k: (module, t, is_param) for k, t, is_param in _own_tensors(module, prefix)})
    missing = [k for k in wanted if k not in index and f".{SIGN_NAME}." not in k]
    unexpected = [k for k in index if k not in wanted]
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match model ({len(missing)} missing, {len(unexpected)} unexpected "
            f"keys{', e.g. ' + (missing + unexpected)[0] if missing or unexpected else ''})"
        )
    handles: dict[Path, Any] = {}
    loaded = 0
    try:
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            own = [(k, t, p) for k, t, p in _own_tensors(module, prefix) if k in index]
            if not own:
                continue
            params = [t for _, t, is_param in own if is_param and hasattr(t, "ds_id")]
            with _gathered(params), torch.no_grad():
                for key, tensor, _ in own:
                    if hasattr(tensor, "ds_id") and rank != 0:
                        continue  # rank 0 writes the gathered module; leaving re-partitions it
                    path, inner = index[key]
                    if path not in handles:
                        handles[path] = safe_open(str(path), framework="pt")
                    value = handles[path].get_tensor(inner)
                    if value.shape != tensor.shape:
                        raise ValueError(
                            f"{where}: {key} has shape {tuple(value.shape)}, the model {tuple(tensor.shape)}"
                        )
                    tensor.data.copy_(value.to(tensor.dtype))
                    loaded += 1
    finally:
        handles.clear()
    return loaded


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[None]:
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
