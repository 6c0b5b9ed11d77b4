"""GPU training-step figures without Ray: DeepSpeed engine vs a plain torch loop, and a Qwen-Image-class
backbone at real width under bf16 + ZeRO-3, flow matching vs TwinFlow (step time, peak GPU memory).

    python benchmarks/gpu_train_step.py --out benchmarks/results/gpu_train_step.json

Needs one CUDA GPU. Ray is not involved (the GPU machine this ran on had no Ray wheel); the worker loop's
per-step work is the same calls: objective(engine, x, cond) -> engine.backward -> engine.step, with the
teacher updated once per step. Text conditions are random (B, L, 384) states: the MiniLM weights are
not needed to time the backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from twinflow.method import Teacher, build_objective
from twinflow.method.config import FlowMatchingConfig, TwinFlowConfig
from twinflow.models import build_generator
from twinflow.models.config import ModelConfig
from twinflow.train.engine import deepspeed_config, full_parameters, init_engine
from twinflow.train.sections import DeepSpeedConfig, TrainConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the script only


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_mem() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else float("nan")


def init_dist() -> None:
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if DEV.type == "cuda" else "gloo")


def batch(model, micro: int, dtype: torch.dtype, text_len: int = 16):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.rand((micro, *model.sample_shape), generator=g, device=DEV).mul(2).sub(1).to(dtype)
    cond = {
        "text_states": torch.randn((micro, text_len, 384), generator=g, device=DEV).to(dtype),
        "text_mask": torch.ones((micro, text_len), dtype=torch.int64, device=DEV),
    }
    null = {
        "text_states": torch.zeros((1, text_len, 384), device=DEV, dtype=dtype),
        "text_mask": torch.ones((1, text_len), dtype=torch.int64, device=DEV),
    }
    return x, cond, null


def timed_steps(step, n_warm: int, n: int) -> float:
    for _ in range(n_warm):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


def run_engine(
    model_cfg: ModelConfig,
    method,
    ds: DeepSpeedConfig,
    micro: int,
    steps: int,
    teacher_mode: str | None = None,
) -> dict:
    reset_mem()
    torch.manual_seed(0)
    t_build = time.perf_counter()
    with torch.device(DEV):
        model = build_generator(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    # as in the worker: the teacher (an fp32 EMA copy) before the engine, which casts the model to bf16
    teacher = Teacher(model, teacher_mode or "online", decay=getattr(method, "ema_decay", 0.999))
    train = TrainConfig(steps=steps, lr=1e-4, micro_batch=micro)
    cfg = deepspeed_config(ds, train, 1)
    cfg["optimizer"]["params"]["torch_adam"] = True  # no FusedAdam JIT build inside a short lease
    engine = init_engine(model, [p for p in model.parameters() if p.requires_grad], cfg)
    build_s = time.perf_counter() - t_build
    dtype = torch.bfloat16 if ds.precision == "bf16" else torch.float32
    objective = build_objective(method)
    x, cond, null = batch(engine.module, micro, dtype)
    gen = torch.Generator(device=DEV).manual_seed(1)
    losses = []

    def step():
        with full_parameters(engine.module, ds.zero_stage):
            teacher.update()
        out = objective(engine, x, cond, teacher=teacher, null_cond=null, generator=gen, update_teacher=False)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))

    s = timed_steps(step, 3, steps)
    res = {
        "params": params,
        "step_s": s,
        "peak_mem_gib": peak_gib(),
        "build_s": build_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(v == v and abs(v) < float("inf") for v in losses),
    }
    engine = model = teacher = None  # free before the next config is measured
    reset_mem()
    return res


def run_plain(model_cfg: ModelConfig, method, micro: int, steps: int) -> dict:
    """The same flow-matching step in a plain torch loop (AdamW, clip 1.0), fp32."""
    reset_mem()
    torch.manual_seed(0)
    with torch.device(DEV):
        model = build_generator(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = build_objective(method)
    teacher = Teacher(model, "online")
    x, cond, null = batch(model, micro, torch.float32)
    gen = torch.Generator(device=DEV).manual_seed(1)

    def step():
        out = objective(model, x, cond, teacher=teacher, null_cond=null, generator=gen, update_teacher=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    s = timed_steps(step, 3, steps)
    return {"step_s": s, "peak_mem_gib": peak_gib()}


def configurations(args) -> dict:
    fm = FlowMatchingConfig(name="flow_matching", loss="mse")
    tiny = ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=16)
    # Qwen-Image's block width (24 heads x 128 = 3072, joint dim 3584), fewer blocks, RGB pixels.
    big = ModelConfig(
        family="qwen_image",
        preset="small-32rgb",
        image_size=args.image_size,
        channels=3,
        patch=2,
        text_max_length=16,
        backbone={
            "num_layers": args.layers,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "joint_attention_dim": 3584,
        },
    )
    z3 = DeepSpeedConfig(zero_stage=3, precision="bf16")
    z2 = DeepSpeedConfig(zero_stage=2, precision="bf16")
    tw = TwinFlowConfig(name="twinflow", **{"lambda": 0.33}, teacher="online")
    tw_ema = TwinFlowConfig(name="twinflow", **{"lambda": 0.33}, teacher="ema", ema_decay=0.999)
    return {
        "tiny_fm_plain_fp32": lambda: run_plain(tiny, fm, 32, args.tiny_steps),
        "tiny_fm_deepspeed_z2_fp32": lambda: run_engine(
            tiny, fm, DeepSpeedConfig(zero_stage=2), 32, args.tiny_steps
        ),
        "big_fm_bf16_z2": lambda: run_engine(big, fm, z2, args.micro, args.steps),
        "big_fm_bf16_z3": lambda: run_engine(big, fm, z3, args.micro, args.steps),
        "big_twinflow_online_bf16_z3": lambda: run_engine(big, tw, z3, args.micro, args.steps),
        "big_twinflow_ema_bf16_z3": lambda: run_engine(big, tw_ema, z3, args.micro, args.steps, "ema"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_train_step.json")
    ap.add_argument(
        "--layers", type=int, default=8, help="Qwen-Image-class blocks at width 3072 (the 20B has 60)"
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny-steps", type=int, default=50)
    ap.add_argument(
        "--one", default=None, help=argparse.SUPPRESS
    )  # internal: one configuration, JSON on stdout
    args = ap.parse_args()
    configs = configurations(args)
    if args.one:  # each configuration in its own process: peak memory is that run's alone
        init_dist()
        try:
            res = configs[args.one]()
        except Exception as exc:
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import subprocess

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": {},
    }
    for i, name in enumerate(configs):
        print(f"== {name}", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            *sum(
                (
                    [f"--{k.replace('_', '-')}", str(v)]
                    for k, v in vars(args).items()
                    if k not in ("one", "out")
                ),
                [],
            ),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": str(29600 + i)}
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-1500:]}
        results["runs"][name] = res
        print(json.dumps(res), flush=True)
        out.write_text(json.dumps(results, indent=2))
    r = results["runs"]
    if "step_s" in r.get("big_fm_bf16_z3", {}) and "step_s" in r.get("big_twinflow_online_bf16_z3", {}):
        results["twinflow_vs_fm"] = {
            "time": r["big_twinflow_online_bf16_z3"]["step_s"] / r["big_fm_bf16_z3"]["step_s"],
            "peak_mem": r["big_twinflow_online_bf16_z3"]["peak_mem_gib"]
            / r["big_fm_bf16_z3"]["peak_mem_gib"],
        }
    if "step_s" in r.get("tiny_fm_plain_fp32", {}) and "step_s" in r.get("tiny_fm_deepspeed_z2_fp32", {}):
        results["deepspeed_vs_plain_tiny"] = (
            r["tiny_fm_deepspeed_z2_fp32"]["step_s"] / r["tiny_fm_plain_fp32"]["step_s"]
        )
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
