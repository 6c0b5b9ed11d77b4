"""Start-up that never holds the whole generator on one device: a ZeRO-3 job constructs it inside
`deepspeed.zero.Init` (each module's weights are partitioned as soon as the module is built), and
`train.init_from` is streamed from the export's safetensors one tensor at a time, in the training
dtype, into each module while only that module is gathered.

Without ZeRO-3 the same streaming load fills the replicated weights (no fp32 host copy of a bf16
base on the way).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from twinflow.models.time_embed import SIGN_NAME
from twinflow.models.weights import EXTRA_FILE


@contextlib.contextmanager
def partitioned_construction(ds_cfg: dict[str, Any] | None, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are partitioned across the ranks at once (ZeRO-3), in `dtype`; with
    parameter offload their partitions live on the host. A no-op for other stages."""
    if ds_cfg is None or ds_cfg["zero_optimization"]["stage"] != 3:
        yield
        return
    import deepspeed

    from twinflow.train.engine import _skip_cpu_jit_builds

    _skip_cpu_jit_builds()
    if torch.distributed.is_initialized():  # DeepSpeed's comm wraps the group Ray Train made
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    offload = ds_cfg["zero_optimization"].get("offload_param")
    with deepspeed.zero.Init(
        config_dict_or_path=ds_cfg,
        dtype=dtype,
        remote_device="cpu" if offload else None,
        mem_efficient_linear=False,
    ):
        yield


def export_index(directory: str | Path) -> dict[str, tuple[Path, str]]:
    """Generator key -> (safetensors file, key in it) of one of our exports: the backbone (and its E2)
    under `transformer/`, the text projection in the extras file. Nothing is read but the headers."""
    directory = Path(directory)
    index: dict[str, tuple[Path, str]] = {}
    files = sorted((directory / "transformer").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}/transformer: no safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            index.update({f"backbone.{k}": (f, k) for k in fh.keys()})
    extra = directory / EXTRA_FILE
    if extra.is_file():
        with safe_open(str(extra), framework="pt") as fh:
            index.update({k: (extra, k) for k in fh.keys()})
    return index


def _own_tensors(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor, bool]]:
    """(generator key, tensor, is a parameter) of the module's own parameters and saved buffers."""
    out = [(f"{prefix}{n}", p, True) for n, p in module.named_parameters(recurse=False)]
    persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
    out += [(f"{prefix}{n}", module._buffers[n], False) for n in persistent if module._buffers[n] is not None]
    return out


def load_streamed(model: nn.Module, directory: str | Path, where: str) -> int:
    """Load an export into `model` module by module (gathered one module at a time under ZeRO-3),
    each tensor read alone and cast to the weight's own dtype; returns how many tensors it loaded.

    Every key must match, except a "mirror" model's sign embedding fine-tuned from a "signed" base
    (it starts from its zero gate). `where` names the source in errors (the job field)."""
    index = export_index(directory)
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
