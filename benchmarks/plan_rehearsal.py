"""Rehearse the 20B recipe's DeepSpeed step on the CPU and print its per-rank bytes beside `twinflow plan`.

    PYTHONPATH=platform .venv/bin/python benchmarks/plan_rehearsal.py [--job jobs/qwen_image_lora.yaml]

The shipped job file with only depth and width shrunk (the same QwenImageTransformer2DModel blocks,
its 3584-d text input, 16-channel latents from the published VAE config, the job's image size and
caption length, LoRA, bf16, activation checkpointing), run on 2 ranks (gloo) under ZeRO-3 with
optimizer and parameter offload, micro-batch 4, gradient accumulation 2, with the online and the EMA
teacher. Per rank it measures, from the engine's own tensors, the weights partition, the optimizer
partition (fp32 master + Adam moments + fp32 gradients), the EMA; from the CPU allocator's record
(torch.profiler memory events) the peak of a micro-step above what was allocated before it, and the
largest no-grad forward. On the CPU every offloaded state is host memory, so the plan's figure shown
is GPU + host for that component.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

SHRINK = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 64, "axes_dims_rope": [32, 16, 16]}


def allocator_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def rehearsal_job(job_path: str, teacher: str, published: str):
    from twinflow.train.config import load_job

    return load_job(
        job_path,
        overrides=[
            "model.pretrained_path=null",
            "model.preset=tiny-28g",
            f"model.backbone={json.dumps(SHRINK)}",
            f"model.vae_path={published}",
            f"model.text_encoder_path={published}",
            "cluster.num_workers=2",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_params=true",
            "deepspeed.gradient_accumulation_steps=2",
            "train.micro_batch=4",
            f"method.teacher={teacher}",
        ],
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def rank_main(rank: int, job_path: str, teacher: str, published: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed

    from twinflow.method import build_objective
    from twinflow.train import modelling
    from twinflow.train.engine import deepspeed_config, init_engine

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    job = rehearsal_job(job_path, teacher, published)
    torch.manual_seed(0)
    model = modelling.build_model(job)
    averages = modelling.build_averages(job, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = init_engine(model, trainable, deepspeed_config(job.deepspeed, job.train, 2))
    dtype = torch.bfloat16
    c, h, w = model.sample_shape
    text, width = job.model.text_max_length, 3584
    g = torch.Generator().manual_seed(rank)

    def batch(n: int):
        x = torch.randn(n, c, h, w, generator=g).to(dtype)
        cond = {
            "text_states": torch.randn(n, text, width, generator=g).to(dtype),
            "text_mask": torch.ones(n, text, dtype=torch.int64),
        }
        return x, cond

    null = {
        "text_states": torch.zeros(1, text, width, dtype=dtype),
        "text_mask": torch.ones(1, text, dtype=torch.int64),
    }
    objective = build_objective(job.method)
    peaks = []
    for _ in range(2 * job.deepspeed.gradient_accumulation_steps):

        def step(xs_conds=batch(job.train.micro_batch)):
            out = objective(engine, *xs_conds, teacher=averages.teacher, null_cond=null)
            engine.backward(out.loss)
            engine.step()

        peaks.append(allocator_peak(step))
    opt = engine.optimizer
    weights = _nbytes(p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor"))
    master = _nbytes(getattr(opt, "fp32_partitioned_groups_flat", []))
    moments = _nbytes(v for s in opt.optimizer.state.values() for v in s.values())
    grads = _nbytes(getattr(t, "grad", None) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    # the EMAs as this branch builds them (method/ema.py: a deep copy of the generator, fp32)
    emas = [a.module for a in (getattr(averages.teacher, "ema", None), averages.sample_ema) if a is not None]
    ema = sum(_nbytes(m.parameters()) for m in emas)
    x, cond = batch(5)
    t = torch.rand(5, generator=g).to(dtype)

    def nograd():
        with torch.no_grad():
            engine(x, t, 0.5 * t, cond)

    nograd_peak = allocator_peak(nograd)
    result = {
        "rank": rank,
        "weights": weights,
        "optimizer": master + moments + grads,
        "ema": ema,
        "step_peak": max(peaks[1:]),
        "nograd_peak": nograd_peak,
    }
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/qwen_image_lora.yaml")
    parser.add_argument("--out", default="runs/plan_rehearsal/result")
    args = parser.parse_args(argv)
    import tempfile

    from twinflow.plan.memory import Layout, estimate
    from twinflow.plan.planner import workload
    from twinflow.plan.published import _write_pipeline, published_configs

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "Qwen-Image"
        _write_pipeline(published_configs("qwen_image"), root)
        for teacher in ("online", "ema"):
            torch.multiprocessing.spawn(rank_main, args=(args.job, teacher, str(root), args.out), nprocs=2)
            job = rehearsal_job(args.job, teacher, str(root))
            work = workload(job)
            plan = estimate(work, Layout(2, 3, True, True, True))
            # the same states, before offload moves them to the host (on the CPU they are all host)
            states = estimate(work, Layout(2, 3, checkpointing=True))
            ranks = [json.loads(Path(args.out).with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
            planned = {
                "weights": states.weights,
                "optimizer": states.optimizer,
                "ema": plan.ema,
                "step_peak": plan.activations + plan.gathered,
                "nograd_peak": plan.nograd_peak,
            }
            print(f"teacher {teacher}: per-rank bytes, measured (rank 0, rank 1) vs twinflow plan")
            for k, v in planned.items():
                got = [r[k] for r in ranks]
                print(
                    f"  {k:12s} {got[0]:>12,d} {got[1]:>12,d}   plan {v:>12,d}   plan/measured {v / max(got) if max(got) else float('nan'):.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
