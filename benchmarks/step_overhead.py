"""The fixed cost of a training step, split into its parts, in ONE process with the loops interleaved
step by step (plain torch, DeepSpeed ZeRO-0, DeepSpeed ZeRO-2, plain, ...) so a loaded machine slows
them alike; medians per part.

    .venv/bin/python benchmarks/step_overhead.py --preset tiny-28g --batch 32 --reps 40
    .venv/bin/python benchmarks/step_overhead.py --preset small-28g --batch 8 --reps 10

Each loop runs the worker's per-step calls on its own copy of the same model (flow matching, one
thread, one process, gloo world of 1, no Ray): batch hand-over (numpy -> tensors, as Ray Data's
batches are turned into the step's inputs), objective (forward, targets, metrics: one host sync),
backward, optimizer (plain: clip + AdamW; DeepSpeed: engine.step, which also clips), and the loop's
own per-step bookkeeping (metric window). Not here: Ray Data's wait (measured in the real job as
`data_wait_frac`, see docs/benchmarks.md) and Ray reporting (only at log/checkpoint steps).
Prints one JSON object; "fixed_ms" = DeepSpeed loop minus plain loop, per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = ("data", "objective", "backward", "optimizer", "bookkeeping")


class PlainLoop:
    def __init__(self, model, lr: float, clip: float) -> None:
        self.model, self.clip = model, clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.forward = model

    def backward(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()


class EngineLoop:
    """The worker's engine (`deepspeed_config` + `init_engine`); `as_before=True`: the stage exactly
    as requested and DeepSpeed's defaults (the engine before the one-rank shortcuts)."""

    def __init__(self, model, zero: int, micro: int, lr: float, clip: float, as_before: bool = False) -> None:
        import deepspeed

        from twinflow.train.engine import deepspeed_config, init_engine
        from twinflow.train.sections import DeepSpeedConfig, TrainConfig

        cfg = deepspeed_config(
            DeepSpeedConfig(zero_stage=zero, gradient_clipping=clip),
            TrainConfig(steps=10**6, micro_batch=micro, lr=lr),
            1,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        if as_before:
            cfg["zero_optimization"]["stage"] = zero
            self.engine = deepspeed.initialize(model=model, model_parameters=params, config=cfg)[0]
        else:
            self.engine = init_engine(model, params, cfg)
        self.stage = self.engine.zero_optimization_stage()
        self.forward = self.engine

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-28g")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)

    import gpu_train_step

    from twinflow.method import build_objective
    from twinflow.method.config import FlowMatchingConfig
    from twinflow.models import build_generator
    from twinflow.models.config import ModelConfig
    from twinflow.train.engine import _skip_cpu_jit_builds

    torch.set_num_threads(1)
    with socket.socket() as sock:  # a free port: a fixed one may be taken by another run on this machine
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    _skip_cpu_jit_builds()  # as in the worker: no shared-memory comm-op compile on CPU
    gpu_train_step.init_dist()
    torch.manual_seed(0)
    base = build_generator(ModelConfig(family="qwen_image", preset=args.preset, text_max_length=16))
    lr, clip = 1e-4, 1.0
    loops = {"plain": PlainLoop(copy.deepcopy(base), lr, clip)}
    for z in args.zero:
        loops[f"worker_engine_zero{z}"] = EngineLoop(copy.deepcopy(base), z, args.batch, lr, clip)
        loops[f"before_zero{z}"] = EngineLoop(copy.deepcopy(base), z, args.batch, lr, clip, as_before=True)
    objective = build_objective(FlowMatchingConfig(cond_dropout=0.1))
    rng = np.random.default_rng(0)
    B = args.batch
    # What Ray Data hands the worker: numpy columns (the worker turns them into tensors on its device)
    npbatch = {
        "image": rng.uniform(-1, 1, (B, *base.sample_shape)).astype(np.float32),
        "text_states": rng.standard_normal((B, 16, 384)).astype(np.float32),
        "text_mask": np.ones((B, 16), dtype=np.int64),
    }
    null = {"text_states": torch.zeros(1, 16, 384), "text_mask": torch.ones(1, 16, dtype=torch.long)}
    gen = torch.Generator().manual_seed(0)
    times = {name: {p: [] for p in (*PARTS, "total")} for name in loops}
    for i in range(args.warmup + args.reps):
        for name, loop in loops.items():
            stamp = [time.perf_counter()]
            batch = {k: torch.as_tensor(v) for k, v in npbatch.items()}
            x = batch["image"].to("cpu", torch.float32)
            cond = {
                "text_states": batch["text_states"].to("cpu", torch.float32),
                "text_mask": batch["text_mask"],
            }
            stamp.append(time.perf_counter())
            out = objective(loop.forward, x, cond, teacher=None, null_cond=null, generator=gen)
            stamp.append(time.perf_counter())
            loop.backward(out.loss)
            stamp.append(time.perf_counter())
            loop.step()
            stamp.append(time.perf_counter())
            window: dict[str, list[float]] = {}
            for k, v in out.metrics.items():
                window.setdefault(k, []).append(float(v))
            stamp.append(time.perf_counter())
            if i >= args.warmup:
                for p, a, b in zip(PARTS, stamp, stamp[1:]):
                    times[name][p].append(b - a)
                times[name]["total"].append(stamp[-1] - stamp[0])
    med = {n: {p: statistics.median(v) * 1e3 for p, v in parts.items()} for n, parts in times.items()}
    plain = med["plain"]["total"]
    result = {
        "preset": args.preset,
        "batch": B,
        "reps": args.reps,
        "median_ms": {n: {p: round(v, 2) for p, v in m.items()} for n, m in med.items()},
    }
    for name in loops:
        if name != "plain":
            result[name] = {
                "fixed_ms": round(med[name]["total"] - plain, 2),
                "ratio": round(med[name]["total"] / plain, 3),
                "zero_stage_run": loops[name].stage,
                "by_part_ms": {p: round(med[name][p] - med["plain"][p], 2) for p in PARTS},
            }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
