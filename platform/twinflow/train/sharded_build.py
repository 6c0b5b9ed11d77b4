"""Start-up that never holds the whole generator on one device: a ZeRO-3 job constructs it inside
`deepspeed.zero.Init` (each module's weights are partitioned as soon as the module is built), and
`train.init_from` is streamed from the export's safetensors one tensor at a time, in the training
dtype, into each module while only that module is gathered.

Without ZeRO-3 the same streaming load (`twinflow.models.streamed`) fills the replicated weights
(no fp32 host copy of a bf16 base on the way).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def partitioned_construction(ds_cfg: dict[str, Any] | None, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are partitioned across the ranks at once (ZeRO-3), in `dtype`; with
    parameter offload their partitions live on the host. A no-op for other stages."""
    if ds_cfg is None or ds_cfg["zero_optimization"]["stage"] != 3:
        yield
        return
    import deepspeed

    # DeepSpeed and its op-builder workaround load only for ZeRO-3 builds
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
