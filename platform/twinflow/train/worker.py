"""The training loop each Ray Train worker runs: readable top to bottom, like DiT's train.py.

build model -> (init_from) -> (LoRA) -> teacher -> DeepSpeed engine -> restore -> loop:
    teacher.update(); loss = objective(engine, x, cond); engine.backward(loss); engine.step()
    log / sample grids / checkpoint+report
-> final checkpoint, export (rank 0), barrier.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from twinflow.data import bad_record_metrics, iter_torch_kwargs
from twinflow.train import checkpointing, editing, lifeline, modelling
from twinflow.train.checkpointing import TrainState
from twinflow.train.config import JobConfig
from twinflow.train.engine import deepspeed_config, full_parameters, init_engine
from twinflow.train.progress import MetricsLog, ProgressLine, ProgressLog
from twinflow.train.schedule import lr_factor, set_lr

log = logging.getLogger(__name__)


def _as_cond(d: dict[str, Any]) -> dict[str, torch.Tensor]:
    # Ray hands arrays over read-only: copy instead of wrapping (torch warns about non-writable arrays)
    return {k: torch.tensor(v) for k, v in d.items()}


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    job = JobConfig.model_validate(config["job"])
    run_dir = Path(config["run_dir"])
    null_cond = _as_cond(config["null_cond"])
    eval_cond = _as_cond(config["eval_cond"]) if config.get("eval_cond") else None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    lifeline.watch_driver(config.get("driver"))  # a dead driver ends this worker at once
    _write_pid(run_dir, rank)
    device = torch.device("cuda", ctx.get_local_rank()) if job.cluster.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))

    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    ds_cfg = deepspeed_config(job.deepspeed, job.train, world)
    model = modelling.build_model(job, ds_cfg).to(device)  # partitioned as it is built at ZeRO-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = init_engine(model, trainable, ds_cfg)
    averages = modelling.build_averages(job, engine)  # on the engine's module: adapters or partitions
    teacher = averages.teacher
    dtype = torch.bfloat16 if job.deepspeed.precision == "bf16" else torch.float32
    objective = modelling.build_objective(job)
    edit_job = editing.is_edit_job(job)

    state = (
        checkpointing.restore(
            engine,
            averages,
            config.get("checkpoint_root"),
            job.output.s3_endpoint,
            log_file=run_dir / "logs" / "checkpoints.log" if rank == 0 else None,
        )
        or TrainState()
    )
    metrics_log = None
    say = ProgressLog(run_dir / "logs" / "progress.log") if rank == 0 else None
    if rank == 0:
        metrics_log = MetricsLog(
            run_dir / "logs" / "metrics.jsonl",
            resume_step=state.step,
            tensorboard_dir=run_dir / "tensorboard" if job.output.tensorboard else None,
        )
        say(
            f"{'resuming from step ' + str(state.step) if state.step else 'starting'}: "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in trainable):,} trainable parameters, "
            f"world size {world}"
        )
    progress = ProgressLine(
        job.train.steps, state.step, job.train.micro_batch * world * job.deepspeed.gradient_accumulation_steps
    )
    gen = torch.Generator(device=device).manual_seed(job.train.seed * 100_003 + rank * 1009 + state.step)
    shard = ray.train.get_dataset_shard("train")
    window: dict[str, list[float]] = {}
    null_cond = {k: v.to(device) for k, v in null_cond.items()}
    data_wait = 0.0
    step_time = 0.0
    micro = 0
    first_wait: float | None = None
    t_first, cpu_first = time.perf_counter(), time.process_time()
    logged: dict[str, float] = {}  # the latest rank-averaged metrics, reported with each checkpoint
    last_eval: dict[str, float] = {}  # the latest judge metrics ("eval/..."), kept in later reports

    def checkpoint(metrics: dict[str, Any]) -> None:
        checkpointing.save(engine, averages, state, rank, metrics)

    while state.step < job.train.steps:
        kwargs = iter_torch_kwargs(job.data, device)
        if "local_shuffle_seed" in kwargs:  # a different local shuffle each epoch and rank
            kwargs["local_shuffle_seed"] += state.epoch * 7919 + rank
        iterator = shard.iter_torch_batches(batch_size=job.train.micro_batch, drop_last=True, **kwargs)
        skip = state.batches_in_epoch  # data position: resume mid-epoch where the checkpoint was
        batches_this_epoch = 0
        t_wait = time.perf_counter()
        for batch in iterator:
            batches_this_epoch += 1
            if skip:
                skip -= 1
                t_wait = time.perf_counter()
                continue
            t_start = time.perf_counter()
            if first_wait is None:  # pipeline start-up (read, embed actors) is not steady-state wait
                first_wait = t_start - t_wait
                t_first, cpu_first = t_start, time.process_time()
            else:
                data_wait += t_start - t_wait
            x = batch["image"].to(device, dtype)
            cond = {
                "text_states": batch["text_states"].to(device, dtype),
                "text_mask": batch["text_mask"].to(device),
            }
            if edit_job:  # the source image as reference tokens (Qwen-Image-Edit layout)
                editing.add_reference(cond, batch, device, dtype)
            if (
                micro % job.deepspeed.gradient_accumulation_steps == 0
            ):  # first micro-batch of a step (EMA before targets)
                set_lr(engine.optimizer, job.train.lr * lr_factor(state.step, job.train.warmup_steps))
                averages.update_teacher()
            # the loop updates the teacher itself, once per optimizer step
            out = objective(
                engine, x, cond, teacher=teacher, null_cond=null_cond, generator=gen, update_teacher=False
            )
            engine.backward(out.loss)
            engine.step()
            micro += 1
            state.batches_in_epoch += 1
            state.samples_seen += x.shape[0]
            for k, v in out.metrics.items():
                window.setdefault(k, []).append(float(v))
            step_time += time.perf_counter() - t_start
            if engine.global_steps == state.step:  # mid gradient accumulation
                t_wait = time.perf_counter()
                continue
            state.step = int(engine.global_steps)
            averages.update_sampling()
            _maybe_inject_failure(job, rank, state.step, run_dir)

            if state.step % job.train.log_every == 0 or state.step == job.train.steps:
                metrics = _mean_across_ranks({k: sum(v) / len(v) for k, v in window.items()})
                window.clear()
                metrics["lr"] = float(engine.optimizer.param_groups[0]["lr"])
                metrics["samples_per_s"] = progress.rate(state.step) * progress.samples_per_step
                metrics["data_wait_frac"] = data_wait / max(step_time + data_wait, 1e-9)
                metrics["data_startup_s"] = first_wait or 0.0
                metrics["step_s"] = step_time / max(micro, 1)
                metrics["elapsed_s"] = (
                    time.perf_counter() - t_first
                )  # wall since the first batch (this attempt)
                # this worker process's CPU seconds since the first batch (all its threads, Ray's too):
                # per step it is the step's cost that other processes on a shared machine do not inflate
                metrics["cpu_s"] = time.process_time() - cpu_first
                metrics["peak_mem_mb"] = peak_memory_mb(device)
                if rank == 0:  # counted by the data pipeline's one counter actor, so far
                    metrics.update(bad_record_metrics(job.data, config.get("bad_records")))
                logged = {**metrics, **last_eval}
                if metrics_log is not None:
                    metrics_log.write({"step": state.step, **metrics})
                    say(progress.line(state.step, metrics))
            is_ckpt = state.step % job.train.checkpoint_every == 0 or state.step == job.train.steps
            at_eval = bool(job.eval.every) and state.step % job.eval.every == 0
            if at_eval and eval_cond is not None:
                with averages.sampling() as sampling_module:
                    modelling.sample_grid(
                        job,
                        sampling_module,
                        eval_cond,
                        run_dir / "samples" / f"step_{state.step:06d}.png",
                        rank=rank,
                        device=device,
                        dtype=dtype,
                        null_cond=null_cond,
                    )
            if (at_eval or state.step == job.train.steps) and eval_cond is not None:
                with averages.sampling() as sampling_module:
                    evaluated = modelling.eval_metrics(
                        job, sampling_module, eval_cond, device=device, null_cond=null_cond
                    )
                if evaluated:
                    last_eval = evaluated
                    logged = {**logged, **evaluated}
                    if metrics_log is not None:
                        metrics_log.write({"step": state.step, **evaluated})
                        say("eval " + " ".join(f"{k[5:]}={v:.3g}" for k, v in evaluated.items()))
                    if not is_ckpt:  # every rank reports (Tune reads these); checkpoints carry them too
                        ray.train.report({**logged, "step": state.step})
            if is_ckpt:
                checkpoint({**logged, "step": state.step, "samples_seen": state.samples_seen * world})
            if state.step >= job.train.steps:
                break
            t_wait = time.perf_counter()
        if batches_this_epoch == 0:
            raise RuntimeError(
                f"rank {rank}: the training data yielded no full micro-batch of "
                f"{job.train.micro_batch} rows; check data.path and the shard sizes"
            )
        if state.step < job.train.steps:
            state.epoch += 1
            state.batches_in_epoch = 0

    if eval_cond is not None:
        with averages.sampling() as sampling_module:
            modelling.sample_grid(
                job,
                sampling_module,
                eval_cond,
                run_dir / "samples" / "final.png",
                rank=rank,
                device=device,
                dtype=dtype,
                null_cond=null_cond,
            )
    with averages.sampling() as sampling_module, full_parameters(sampling_module, job.deepspeed.zero_stage):
        if rank == 0:
            modelling.export(job, sampling_module, run_dir / "export", steps=state.step)
    if metrics_log is not None:
        metrics_log.close()
    if dist.is_initialized():
        dist.barrier()  # every rank before teardown: avoids "terminate called without an active exception"


def _write_pid(run_dir: Path, rank: int) -> None:
    """`logs/workers/rank<R>.pid`: which processes train this run (the driver-death test checks them)."""
    path = run_dir / "logs" / "workers" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _maybe_inject_failure(job: JobConfig, rank: int, step: int, run_dir: Path) -> None:
    """Fault injection for tests: rank 1 (or 0 on one worker) dies for real, once, at `fail_at_step`."""
    if job.train.fail_at_step is None or step != job.train.fail_at_step:
        return
    victim = 1 if job.cluster.num_workers > 1 else 0
    marker = run_dir / f".injected_failure_step{step}"
    if rank == victim and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        log.warning("fault injection: rank %d exits at step %d", rank, step)
        os._exit(17)
