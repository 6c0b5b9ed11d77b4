"""Rehearse the 20B recipe's DeepSpeed step on the CPU and print its per-rank bytes beside `twinflow plan`.

    PYTHONPATH=platform .venv/bin/python benchmarks/plan_rehearsal.py [--job jobs/qwen_image_lora.yaml]
        [--teacher online --teacher ema] [--set model.patch=2 ...]

The shipped job file with only depth and width shrunk (the same QwenImageTransformer2DModel blocks,
its 3584-d text input, 16-channel latents from the published VAE config, the job's image size and
caption length, LoRA, bf16, activation checkpointing), run on 2 ranks (gloo) under ZeRO-3 with
optimizer and parameter offload, micro-batch 4, gradient accumulation 2, with the online and the EMA
teacher. Per rank it measures, from the engine's own tensors, the weights partition, the optimizer
partition (fp32 master + Adam moments + fp32 gradients), the EMA (the tensors the averages hold),
DeepSpeed's contiguous-gradient bucket;
from the CPU allocator's record (torch.profiler memory events) the peak of a micro-step (its batch
made inside it, as a loader's batch lands on the device) above what was allocated before it, and the
largest no-grad forward of the step (as many rows as the plan finds, with the micro-batch and the
call's gathered inputs alive). On the CPU every offloaded state is host memory, so the plan's figure
shown is GPU + host for that component.
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


def rehearsal_job(job_path: str, teacher: str, published: str, extra: tuple[str, ...] = ()):
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
            *extra,
        ],
    )


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _held(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_held(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held(v) for v in obj)
    return 0


def rank_main(
    rank: int, job_path: str, teacher: str, published: str, out: str, extra: tuple, nograd_rows: int
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed

    from twinflow.method import build_objective
    from twinflow.train import modelling
    from twinflow.train.engine import deepspeed_config, init_engine

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    job = rehearsal_job(job_path, teacher, published, extra)
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
        x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        cond = {
            "text_states": torch.randn(n, text, width, generator=g, dtype=dtype),
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

        def step():
            out = objective(engine, *batch(job.train.micro_batch), teacher=averages.teacher, null_cond=null)
            engine.backward(out.loss)
            engine.step()

        peaks.append(allocator_peak(step))
    opt = engine.optimizer
    weights = _nbytes(p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor"))
    master = _nbytes(getattr(opt, "fp32_partitioned_groups_flat", []))
    moments = _nbytes(v for s in opt.optimizer.state.values() for v in s.values())
    grads = _nbytes(getattr(t, "grad", None) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    # DeepSpeed's contiguous-gradient bucket(s) (ZeRO-3 allocates them at engine start)
    buckets = [getattr(b, "buffer", None) for b in getattr(opt, "ipg_buckets", {}).values()]
    flat = [t for b in buckets for t in (b if isinstance(b, list) else [b])]
    # what the averages hold (an adapter EMA and its sharded side, `train/averages.py`)
    ema = sum(_held(part.state_dict()) for part in averages._parts().values())

    def nograd():
        micro = batch(job.train.micro_batch)  # the step's own batch is alive during its calls
        x, cond = batch(nograd_rows)
        t = torch.rand(nograd_rows, generator=g).to(dtype)
        with torch.no_grad():
            engine(x, t, 0.5 * t, cond)
        del micro

    nograd_peak = allocator_peak(nograd)
    result = {
        "rank": rank,
        "weights": weights,
        "optimizer": master + moments + grads,
        "ema": ema,
        "buffers": _nbytes(flat),
        "step_peak": max(peaks[1:]),
        "nograd_peak": nograd_peak,
    }
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/qwen_image_lora.yaml")
    parser.add_argument("--out", default="runs/plan_rehearsal/result")
    parser.add_argument("--teacher", action="append", choices=("online", "ema"), default=None)
    parser.add_argument(
        "--set", action="append", default=[], help="a further job override, e.g. model.patch=2"
    )
    parser.add_argument(
        "--from-saved",
        action="store_true",
        help="no run: print the plan beside the measurements a previous run saved under --out",
    )
    args = parser.parse_args(argv)
    extra = tuple(args.set)
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
        for teacher in args.teacher or ["online", "ema"]:
            job = rehearsal_job(args.job, teacher, str(root), extra)
            work = workload(job)
            saved = Path(args.out).with_suffix(f".{teacher}.json")
            if args.from_saved:
                ranks = json.loads(saved.read_text())["ranks"]
                for r in ranks:  # runs saved before the bucket was measured
                    r.setdefault("buffers", 0)
            else:
                spawn_args = (args.job, teacher, str(root), args.out, extra, work.nograd_rows)
                torch.multiprocessing.spawn(rank_main, args=spawn_args, nprocs=2)
                ranks = [json.loads(Path(args.out).with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
            plan = estimate(work, Layout(2, 3, True, True, True))
            # the same states, before offload moves them to the host (on the CPU they are all host)
            states = estimate(work, Layout(2, 3, checkpointing=True))
            planned = {
                "weights": states.weights,
                "optimizer": states.optimizer,
                "ema": states.ema,
                "buffers": plan.buffers,
                # the micro-step runs the no-grad calls as well as the grad pass: the larger of the two
                "step_peak": max(plan.activations, plan.nograd_peak) + plan.gathered,
                "nograd_peak": plan.nograd_peak,
            }
            c = work.counts
            print(
                f"teacher {teacher} {' '.join(extra)}: {c.layers} blocks, width {c.width}, "
                f"{work.tokens} tokens per row ({c.text_tokens} caption tokens at {c.text_width}), "
                f"rows: grad {work.grad_rows}, largest no-grad {work.nograd_rows}, "
                f"no-grad after the grad forward {work.overlap_rows}"
            )
            print("| per rank, bytes | rank 0 | rank 1 | plan | plan / measured |")
            print("|---|---|---|---|---|")
            for k, v in planned.items():
                got = [r[k] for r in ranks]
                ratio = f"{v / max(got):.2f}" if max(got) else ("1.00" if v == 0 else "inf")
                print(f"| {k} | {got[0]:,d} | {got[1]:,d} | {v:,d} | {ratio} |")
            summary = {"teacher": teacher, "overrides": list(extra), "ranks": ranks, "plan": planned}
            saved.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
