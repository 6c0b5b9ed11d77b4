"""A DeepSpeed run on `--world` gloo processes without Ray, for the resume-on-another-layout tests.

Each run trains a small model (one frozen layer, as LoRA's base) on a fixed global batch per step,
split across ranks, so any world size computes the same gradients up to summation order. It restores
`--resume` first (native files on the same layout, the universal conversion otherwise, through
`twinflow.train.checkpointing`'s own choice), then trains to `--steps`, saving a checkpoint with its
manifests into `--save` at step `--save-at`, and writes `--out` (rank 0): per step the loss and lr,
and the full fp32 weights, Adam moments and Adam step right after the restore, at the save, at the end.

    python tests/train/relayout_worker.py --world 2 --stage 2 --steps 3 --save DIR --out run.pt
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

GLOBAL_BATCH = 8
LR = 0.01
WARMUP = 4


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )
    net[0].requires_grad_(False)  # frozen, as a LoRA base
    return net


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {fp32, exp_avg, exp_avg_sq, step}: whole tensors, on every layout."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    stage = engine.zero_optimization_stage()
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if stage == 0:
            st = opt.state[p]
            out[name] = {
                "fp32": p.detach().clone(),
                "exp_avg": st["exp_avg"].clone(),
                "exp_avg_sq": st["exp_avg_sq"].clone(),
            }
            step = st["step"]
        else:
            out[name] = {
                "fp32": safe_get_full_fp32_param(p).clone(),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
            }
            base = engine.optimizer.optimizer  # the ZeRO optimizer's torch AdamW, one state per flat group
            step = next(iter(base.state.values()))["step"]
        out[name]["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
    return out


def run(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world))
    import deepspeed
    import torch.distributed as dist

    from twinflow.train import checkpointing
    from twinflow.train.checkpointing import TrainState
    from twinflow.train.engine import _skip_cpu_jit_builds, init_engine
    from twinflow.train.schedule import lr_factor, set_lr

    torch.set_num_threads(1)
    _skip_cpu_jit_builds()  # before DeepSpeed's comm starts: no shared-memory op compile on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    zero = {"stage": args.stage}
    if args.stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // args.world,
        "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL_BATCH,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.99], "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    net = model()
    engine = init_engine(net, [p for p in net.parameters() if p.requires_grad], cfg)
    state = TrainState()
    record: dict = {"losses": {}, "lr": {}}
    if args.resume:
        state = checkpointing.load_directory(engine, None, args.resume)[0]
        record["restored"] = full_state(engine)
        record["restored_step"] = state.step
        record["engine_steps"] = int(engine.global_steps)
    save_at = args.save_at if args.save_at is not None else args.steps
    while True:
        if args.save and state.step == save_at:
            record["saved"] = full_state(engine)
            save(engine, state, rank, args)
        if state.step >= args.steps:
            break
        set_lr(engine.optimizer, LR * lr_factor(state.step, WARMUP))
        record["lr"][state.step + 1] = float(engine.optimizer.param_groups[0]["lr"])
        x, y = batch(state.step, rank, args.world)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        state.step = int(engine.global_steps)
        t = loss.detach().clone()
        dist.all_reduce(t)
        record["losses"][state.step] = float(t) / args.world
    record["final"] = full_state(engine)
    if rank == 0:
        torch.save(record, args.out)
    dist.barrier()


def save(engine, state, rank: int, args: argparse.Namespace) -> None:
    """The checkpoint as `checkpointing.save` writes it (client state, then each rank's manifest)."""
    import torch.distributed as dist

    from twinflow.train import checkpointing, manifest

    d = Path(args.save)
    client = {
        "train_state": state.as_dict(),
        checkpointing.relayout.TRAINABLE_KEY: checkpointing.trainable_names(engine.module),
    }
    engine.save_checkpoint(str(d), tag=checkpointing.TAG, client_state=client)
    dist.barrier()
    manifest.write_manifest(d, rank, args.world, state.step, engine.zero_optimization_stage())
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--resume")
    ap.add_argument("--save")
    ap.add_argument("--save-at", type=int, help="the step to save at (default: --steps)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.spawn(run, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    sys.exit(main())
