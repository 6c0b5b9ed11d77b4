"""One rank of the partitioned start-up check (tests/train/test_sharded_build.py starts two).

argv: rank, world, port, output directory. Builds the Fashion job's generator at ZeRO-3 in bf16 with
`train.init_from` the fixture export, recording the live parameter bytes of this rank (full tensors
plus ZeRO-3 partitions) after every parameter registration and every gather, then checks the
gathered weights against the export. Rank 0 writes <out>/result.json."""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

import torch

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
torch.set_num_threads(1)
os.environ.update(
    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
)

import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", rank=rank, world_size=world)

import deepspeed  # noqa: E402
from torch.nn.modules.module import register_module_parameter_registration_hook  # noqa: E402

from twinflow.models.export_loader import load_generator  # noqa: E402
from twinflow.train import modelling  # noqa: E402
from twinflow.train.config import load_job  # noqa: E402
from twinflow.train.engine import deepspeed_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "fashion_base"
job = load_job(
    REPO / "jobs" / "fashion_twinflow.yaml",
    [
        f"train.init_from={FIXTURE}",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=bf16",
        "train.micro_batch=2",
        f"cluster.num_workers={world}",
    ],
)
seen: list[weakref.ref] = []
peak = {"bytes": 0}


def live_bytes() -> int:
    total = 0
    for ref in seen:
        p = ref()
        if p is None:
            continue
        total += p.data.numel() * p.element_size()
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            total += ds.numel() * ds.element_size()
    return total


def note() -> None:
    peak["bytes"] = max(peak["bytes"], live_bytes())


def on_register(module, name, param):
    if param is not None and param.device.type != "meta":
        seen.append(weakref.ref(param))
        note()


enter = deepspeed.zero.GatheredParameters.__enter__


def gathered_enter(self):
    result = enter(self)
    note()
    return result


deepspeed.zero.GatheredParameters.__enter__ = gathered_enter
handle = register_module_parameter_registration_hook(on_register)
ds_cfg = deepspeed_config(job.deepspeed, job.train, world)
model = modelling.build_model(job, ds_cfg)
note()
handle.remove()
deepspeed.zero.GatheredParameters.__enter__ = enter

params = list(model.parameters())
partitioned = all(hasattr(p, "ds_id") for p in params)
element = 2  # bf16
total = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * element for p in params)
largest_module = max(
    sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * element for p in m.parameters(recurse=False))
    for m in model.modules()
)
blocks = getattr(model.backbone, "transformer_blocks", None)
largest_block = max(sum(p.ds_numel * element for p in b.parameters()) for b in blocks) if blocks else 0
after_build = live_bytes()

want, _ = load_generator(FIXTURE)
want_sd = {k: v.to(torch.bfloat16) for k, v in want.state_dict().items()}
with deepspeed.zero.GatheredParameters(params):
    got = {n: p.detach().clone() for n, p in model.named_parameters()}
mismatch = [n for n, v in got.items() if not torch.equal(v, want_sd[n])]
dtypes = sorted({str(p.dtype) for p in params})
result = {
    "partitioned": partitioned,
    "total_bytes": total,
    "largest_module_bytes": largest_module,
    "largest_block_bytes": largest_block,
    "peak_bytes": peak["bytes"],
    "after_build_bytes": after_build,
    "mismatch": mismatch[:5],
    "dtypes": dtypes,
    "n_params": len(got),
}
peaks = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
dist.all_gather(peaks, torch.tensor([peak["bytes"]]))
result["peak_bytes_per_rank"] = [int(p) for p in peaks]
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
dist.barrier()
dist.destroy_process_group()
