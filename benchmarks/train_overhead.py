"""Ray Train + DeepSpeed step time vs a plain single-process torch loop, and peak memory of TwinFlow vs
flow-matching training, on the same model (tiny Qwen-Image, Fashion-MNIST) and micro-batch.

    .venv/bin/python benchmarks/train_overhead.py            # ~6 min on 2 cores; writes
                                                             # benchmarks/results/train_overhead.json

Plain loop: one process, one thread, AdamW + clipping, batches decoded and embedded once up front (no
data cost at all: the best case). Ray: `twinflow train jobs/fashion_base_fm.yaml` with ONE worker of one
CPU (same threads), Ray Data streaming and the DeepSpeed engine (ZeRO-2). Steady state: the time between
the log lines at `--warmup` and at the last step, from each run's own clock (metrics.jsonl `elapsed_s`,
which includes waiting for data). Peak memory: the worker's peak resident set (CPU) at the end of a
flow-matching and a TwinFlow job of the same size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def plain_loop(job, steps: int, warmup: int) -> dict:
    from twinflow.data import iter_local_batches
    from twinflow.models import build_generator
    from twinflow.models.text_encoder import TextEncoder
    from twinflow.train import modelling

    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = TextEncoder(max_length=job.data.text_max_length)
    pool = []
    for b in iter_local_batches(
        job.data, batch_size=job.train.micro_batch, encoder=enc, limit=job.train.micro_batch * 20
    ):
        if len(b["id"]) == job.train.micro_batch:
            pool.append(
                (
                    torch.as_tensor(b["image"]),
                    {
                        "text_states": torch.as_tensor(b["text_states"]),
                        "text_mask": torch.as_tensor(b["text_mask"]),
                    },
                )
            )
    model = build_generator(job.model)
    teacher = modelling.build_teacher(job, model)
    objective = modelling.build_objective(job)
    null = {k: v for k, v in enc.null_condition().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr, betas=job.train.betas)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps):
        x, cond = pool[i % len(pool)]
        t0 = time.perf_counter()
        teacher.update()
        out = objective(model, x, cond, teacher=teacher, null_cond=null, generator=gen, update_teacher=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.deepspeed.gradient_clipping)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.mean(times[warmup:])), "steps": steps}


def ray_job(job, steps: int, warmup: int, out_dir: Path) -> dict:
    from twinflow.train.launcher import run_job

    result = run_job(job, fresh=True)
    if not result.ok:
        raise RuntimeError(f"job {job.name} failed: {result.error}")
    rows = [
        json.loads(line)
        for line in (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    at = {r["step"]: r for r in rows}
    a, b = at[warmup], at[steps]
    return {
        "step_s": (b["elapsed_s"] - a["elapsed_s"]) / (steps - warmup),
        "steps": steps,
        "data_wait_frac": b["data_wait_frac"],
        "peak_mem_mb": b["peak_mem_mb"],
        "final_loss": b["total"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--mem-steps", type=int, default=40)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_overhead.json"))
    args = ap.parse_args()

    from twinflow.demo import ensure_shards
    from twinflow.train.config import load_job

    ensure_shards()
    tmp = Path(tempfile.mkdtemp(prefix="twinflow-overhead-"))
    common = [
        f"output.dir={tmp}",
        "cluster.num_workers=1",
        "cluster.cpus_per_worker=1",
        "eval.prompts=[]",
        "output.tensorboard=false",
        "train.checkpoint_every=100000",
        "train.log_every=20",
    ]
    base = REPO / "jobs" / "fashion_base_fm.yaml"
    twin = REPO / "jobs" / "fashion_twinflow.yaml"
    res: dict = {"machine": "2-core CPU", "torch_threads": 1}

    job = load_job(base, [*common, f"train.steps={args.steps}", "name=overhead_fm"])
    res["plain_loop"] = plain_loop(job, args.steps, args.warmup)
    print("plain", res["plain_loop"], flush=True)
    res["ray_train_deepspeed"] = ray_job(job, args.steps, args.warmup, tmp)
    print("ray", res["ray_train_deepspeed"], flush=True)
    res["overhead"] = res["ray_train_deepspeed"]["step_s"] / res["plain_loop"]["step_s"]

    if args.mem_steps <= 0:  # --mem-steps 0: the step-time comparison only
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps({"overhead": res["overhead"]}))
        return 0
    mem = {}
    for name, path, extra in [
        ("flow_matching", base, []),
        ("twinflow_online", twin, ["method.teacher=online", "train.init_from=null"]),
        ("twinflow_ema", twin, ["train.init_from=null"]),
    ]:
        j = load_job(path, [*common, f"train.steps={args.mem_steps}", f"name=mem_{name}", *extra])
        mem[name] = ray_job(j, args.mem_steps, args.mem_steps // 2, tmp)
        print(name, mem[name], flush=True)
    res["memory"] = mem
    res["twinflow_vs_fm_peak_mem"] = {
        k: mem[k]["peak_mem_mb"] / mem["flow_matching"]["peak_mem_mb"]
        for k in ("twinflow_online", "twinflow_ema")
    }
    res["twinflow_vs_fm_step_time"] = {
        k: mem[k]["step_s"] / mem["flow_matching"]["step_s"] for k in ("twinflow_online", "twinflow_ema")
    }
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(
        json.dumps(
            {k: res[k] for k in ("overhead", "twinflow_vs_fm_peak_mem", "twinflow_vs_fm_step_time")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
