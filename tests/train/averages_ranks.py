"""One rank of the sharded-averages check (tests/train/test_averages_sharded.py starts two).

argv: rank, world, port, ZeRO stage, "lora" or "full", output directory. Trains a tiny generator under
a real DeepSpeed engine (gloo), updates the averages every step beside a reference full-copy EMA fed
the gathered online weights, and writes what rank 0 measured to <out>/result.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

rank, world, port, stage, kind, out = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    sys.argv[3],
    int(sys.argv[4]),
    sys.argv[5],
    Path(sys.argv[6]),
)
torch.set_num_threads(1)
os.environ.update(
    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
)

import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", rank=rank, world_size=world)

import deepspeed  # noqa: E402

from twinflow.method.ema import EMA  # noqa: E402
from twinflow.models.config import LoraSettings, ModelConfig  # noqa: E402
from twinflow.models.generator import build_generator  # noqa: E402
from twinflow.models.lora import apply_lora  # noqa: E402
from twinflow.train import averages as avg  # noqa: E402
from twinflow.train.engine import _skip_cpu_jit_builds, full_parameters  # noqa: E402

STEPS, DECAY, SAMPLE_DECAY = 6, 0.8, 0.7

torch.manual_seed(0)
g = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", e2_init="random"))
if kind == "lora":
    apply_lora(g, LoraSettings(rank=4))
reference_teacher = EMA(g, DECAY)  # whole copies, fed the gathered online weights each step
reference_sampling = EMA(g, SAMPLE_DECAY)
trainable = [p for p in g.parameters() if p.requires_grad]
_skip_cpu_jit_builds()
cfg = {
    "train_micro_batch_size_per_gpu": 2,
    "train_batch_size": 2 * world,
    "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "torch_adam": True}},
    "steps_per_print": 10**9,
}
engine, *_ = deepspeed.initialize(model=g, model_parameters=trainable, config=cfg)
averages = avg.build(
    engine.module,
    teacher_mode="ema",
    teacher_decay=DECAY,
    sample_decay=SAMPLE_DECAY,
    release=avg.zero3_release(engine),
)


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    t = torch.rand(2, generator=gen)
    cond = {
        "text_states": torch.randn(2, 8, 384, generator=gen),
        "text_mask": torch.ones(2, 8, dtype=torch.long),
    }
    return x, t, t * 0.5, cond


def gathered_online():
    with full_parameters(engine.module, stage):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def feed(reference, online):
    with torch.no_grad():
        for n, p in reference.module.named_parameters():
            if n in online:
                p.data.lerp_(online[n].float(), 1.0 - reference.current_decay)
    reference.num_updates += 1
    from twinflow.method.ema import next_decay

    reference.current_decay = next_decay(reference.current_decay, reference.decay)


for step in range(STEPS):
    averages.update_teacher()
    feed(reference_teacher, gathered_online())
    x, t, r, cond = batch(step * world + rank)
    loss = engine(x, t, r, cond).square().mean()
    averages.teacher(x, t, t, cond)  # between forward and backward, as the objective calls it
    engine.backward(loss)
    engine.step()
    averages.update_sampling()
    feed(reference_sampling, gathered_online())

result = {"stage": stage, "kind": kind}
errors = {}
for label, kept, reference in (
    ("teacher", averages.teacher.average, reference_teacher),
    ("sampling", averages.sample_ema, reference_sampling),
):
    full = kept.full()
    ref = dict(reference.module.named_parameters())
    errors[label] = max((full[n] - ref[n].detach().float()).abs().max().item() for n in full)
    result[f"{label}_names"] = len(full)
result["max_abs_error"] = errors

# the teacher answers as the reference EMA copy, and the online model answers as before the call
x, t, r, cond = batch(1000)
with torch.no_grad():
    online_before = engine.module(x, t, r, cond)
    teacher_out = averages.teacher(x, t, r, cond)
    online_after = engine.module(x, t, r, cond)
    want = reference_teacher.module(x, t, r, cond)
result["teacher_vs_reference"] = (teacher_out - want).abs().max().item()
result["teacher_vs_online"] = (teacher_out - online_before).abs().max().item()
result["online_unchanged"] = bool(torch.equal(online_before, online_after))

# sampling from the sampling EMA, gathered for an export (rank 0 reads it)
with averages.sampling() as module, full_parameters(module, stage):
    sampled = {
        n: p.detach().clone()
        for n, p in module.named_parameters()
        if n in dict(reference_sampling.module.named_parameters())
    }
ref_s = dict(reference_sampling.module.named_parameters())
trained = {n for n, p in engine.module.named_parameters() if p.requires_grad}
result["sampling_module_error"] = max(
    (sampled[n].float() - ref_s[n].detach()).abs().max().item() for n in trained
)

# per-rank averages memory: this rank's shards against the whole trainable set
shards = averages.teacher.average.side.shards if kind == "lora" else averages.teacher.average.shards
mine = torch.tensor([sum(s.numel() for s in shards)])
all_numels = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
dist.all_gather(all_numels, mine)
result["shard_numel_per_rank"] = [int(n) for n in all_numels]
result["trainable_numel"] = (
    sum(ref_s[n].numel() for n in trained if ".lora_" not in f".{n}")
    if kind == "lora"
    else sum(ref_s[n].numel() for n in trained)
)

# a checkpoint round trip at this world size
ckpt = out / "ckpt"
ckpt.mkdir(parents=True, exist_ok=True)
averages.save(ckpt)
dist.barrier()
before = averages.teacher.average.full()
for s in shards:
    s.zero_()
averages.load(ckpt)
after = averages.teacher.average.full()
result["checkpoint_roundtrip"] = all(torch.equal(before[n], after[n]) for n in before)

if rank == 0:
    (out / "result.json").write_text(json.dumps(result, indent=1))
dist.barrier()
dist.destroy_process_group()
