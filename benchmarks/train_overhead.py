"""Ray Train + DeepSpeed step time vs a plain single-process torch loop, and peak memory of TwinFlow vs
flow-matching training, on the same model (tiny Qwen-Image, Fashion-MNIST) and micro-batch.

    .venv/bin/python benchmarks/train_overhead.py            # ~6 min on 2 cores; writes
                                                             # benchmarks/results/train_overhead.json

Plain loop: one process, one thread, AdamW + clipping, batches decoded and embedded once up front (no
data cost at all: the best case); it runs before AND after the Ray job, so a load change during the
run shows as a difference between the two. Ray: `twinflow train jobs/fashion_base_fm.yaml` with ONE
worker of one CPU (same threads), Ray Data streaming and the DeepSpeed engine (ZeRO-2 asked; one rank
runs it as stage 0). Steady state: between the log lines at `--warmup` and at the last step, from the
worker's own metrics (metrics.jsonl): wall (`elapsed_s`, includes waiting for data), the in-loop
compute per step (`step_s`: objective, backward, engine step, metric bookkeeping), the data wait and
the rest (iterator, the sampling EMA's update, logging; the plain loop updates that EMA too, timed
apart); and CPU seconds per step (`cpu_s`: the worker process, all its threads; the plain loop's own
process time), which a loaded shared machine inflates far less than wall time. Peak memory: the worker's peak resident set (CPU) at the end of a flow-matching and a
TwinFlow job of the same size.
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
    averages = modelling.build_averages(job, model)  # the teacher and the sampling EMA, as the worker
    teacher = averages.teacher
    objective = modelling.build_objective(job)
    null = {k: v for k, v in enc.null_condition().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr, betas=job.train.betas)
    gen = torch.Generator().manual_seed(0)
    times, cpu, ema = [], [], []
    for i in range(steps):
        x, cond = pool[i % len(pool)]
        t0, c0 = time.perf_counter(), time.process_time()
        averages.update_teacher()
        out = objective(model, x, cond, teacher=teacher, null_cond=null, generator=gen, update_teacher=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.deepspeed.gradient_clipping)
        opt.step()
        t_ema = time.perf_counter()
        averages.update_sampling()
        ema.append(time.perf_counter() - t_ema)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "step_s": float(np.mean(times[warmup:])),
        "step_s_median": float(np.median(times[warmup:])),
        "cpu_s": float(np.mean(cpu[warmup:])),
        "sample_ema_s": float(np.mean(ema[warmup:])),
        "steps": steps,
    }


def ray_job(job, steps: int, warmup: int, out_dir: Path) -> dict:
    from twinflow.train.launcher import run_job

    result = run_job(job, fresh=True)
    if not result.ok:
        raise RuntimeError(f"job {job.name} failed: {result.error}")
    rows = [
        json.loads(line)
        for line in (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    at = {r["step"]: r for r in rows if "elapsed_s" in r}
    a, b = at[warmup], at[steps]
    n = steps - warmup
    wall = (b["elapsed_s"] - a["elapsed_s"]) / n
    # step_s and data_wait_frac are running means since the first batch: difference the totals
    busy_a, busy_b = a["step_s"] * a["step"], b["step_s"] * b["step"]
    wait_a = a["data_wait_frac"] / (1 - a["data_wait_frac"]) * busy_a
    wait_b = b["data_wait_frac"] / (1 - b["data_wait_frac"]) * busy_b
    out = {
        "step_s": wall,
        "steps": steps,
        "compute_s": (busy_b - busy_a) / n,
        "data_wait_s": (wait_b - wait_a) / n,
        "data_wait_frac": b["data_wait_frac"],
        "peak_mem_mb": b["peak_mem_mb"],
        "final_loss": b["total"],
    }
    if "cpu_s" in a:
        out["cpu_s"] = (b["cpu_s"] - a["cpu_s"]) / n
    return out


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
    ray_res = res["ray_train_deepspeed"] = ray_job(job, args.steps, args.warmup, tmp)
    print("ray", ray_res, flush=True)
    res["plain_loop_after"] = plain_loop(job, args.steps, args.warmup)
    print("plain after", res["plain_loop_after"], flush=True)
    plain = {
        k: (res["plain_loop"][k] + res["plain_loop_after"][k]) / 2
        for k in ("step_s", "cpu_s", "sample_ema_s")
    }
    res["overhead"] = ray_res["step_s"] / plain["step_s"]
    wait = ray_res["data_wait_s"]
    res["decomposition_ms"] = {  # Ray's wall per step minus the plain loop's, split
        "compute_vs_plain": 1e3 * (ray_res["compute_s"] - (plain["step_s"] - plain["sample_ema_s"])),
        "data_wait": 1e3 * wait,
        # iterator, sampling EMA, logging, minus the plain loop's sampling EMA
        "rest_vs_plain": 1e3 * (ray_res["step_s"] - ray_res["compute_s"] - wait - plain["sample_ema_s"]),
    }
    if "cpu_s" in ray_res:
        res["cpu_overhead"] = ray_res["cpu_s"] / plain["cpu_s"]
        res["cpu_fixed_ms"] = 1e3 * (ray_res["cpu_s"] - plain["cpu_s"])

    if args.mem_steps <= 0:  # --mem-steps 0: the step-time comparison only
        Path(args.out).write_text(json.dumps(res, indent=2))
        keys = ("overhead", "decomposition_ms", "cpu_overhead", "cpu_fixed_ms")
        print(json.dumps({k: res[k] for k in keys if k in res}, indent=2))
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
