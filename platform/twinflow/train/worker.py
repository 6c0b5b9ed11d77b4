"""What a Ray Train worker adds to the training loop (`train.loop`): its rank, its data shard, the
DeepSpeed engine, and the hand-off of checkpoints and metrics to Ray Train.

build model -> (init_from) -> (LoRA) -> teacher -> DeepSpeed engine -> restore -> loop.run(...)
-> final grid, export (rank 0), barrier.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from twinflow.data import bad_record_metrics, iter_torch_kwargs
from twinflow.train import checkpointing, editing, lifeline, loop, modelling, tracking
from twinflow.train.checkpointing import TrainState
from twinflow.train.config import JobConfig
from twinflow.train.engine import deepspeed_config, full_parameters, init_engine
from twinflow.train.engines import DeepSpeedEngine
from twinflow.train.progress import MetricsLog, ProgressLine, ProgressLog

log = logging.getLogger(__name__)


def _as_cond(d: dict[str, Any]) -> dict[str, torch.Tensor]:
    # Ray hands arrays over read-only: copy instead of wrapping (torch warns about non-writable arrays)
    return {k: torch.tensor(v) for k, v in d.items()}


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    job = JobConfig.model_validate(config["job"])
    run_dir = Path(config["run_dir"])
    eval_cond = _as_cond(config["eval_cond"]) if config.get("eval_cond") else None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    lifeline.watch_driver(config.get("driver"))  # a dead driver ends this worker at once
    _write_pid(run_dir, rank)
    device = torch.device("cuda", ctx.get_local_rank()) if job.cluster.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    dtype = modelling.train_dtype(job)

    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    ds_cfg = deepspeed_config(job.deepspeed, job.train, world)
    model = modelling.build_model(job, ds_cfg).to(device)  # partitioned as it is built at ZeRO-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_engine = init_engine(model, trainable, ds_cfg)
    averages = modelling.build_averages(job, ds_engine)  # on the engine's module: adapters or partitions
    engine = DeepSpeedEngine(ds_engine, job.deepspeed.zero_stage)
    state = (
        checkpointing.restore(
            ds_engine,
            averages,
            config.get("checkpoint_root"),
            job.output.s3_endpoint,
            log_file=run_dir / "logs" / "checkpoints.log" if rank == 0 else None,
        )
        or TrainState()
    )
    null_cond = {k: v.to(device) for k, v in _as_cond(config["null_cond"]).items()}
    run = loop.Loop(job, engine, averages, state)
    progress = ProgressLine(
        job.train.steps, state.step, job.train.micro_batch * world * job.deepspeed.gradient_accumulation_steps
    )
    metrics_log: MetricsLog | None = None
    say: ProgressLog | None = None
    if rank == 0:
        metrics_log = MetricsLog(
            run_dir / "logs" / "metrics.jsonl",
            resume_step=state.step,
            tensorboard_dir=run_dir / "tensorboard" if job.output.tensorboard else None,
        )
        say = ProgressLog(run_dir / "logs" / "progress.log")
        say(
            f"{'resuming from step ' + str(state.step) if state.step else 'starting'}: "
            f"{sum(getattr(p, 'ds_numel', p.numel()) for p in trainable):,} trainable parameters, "
            f"world size {world}"
        )
    tracker = tracking.JobTracker.for_rank(job, run_dir, rank, say)  # MLflow (rank 0, when configured)

    def write_metrics(step: int, metrics: dict[str, float]) -> None:
        if metrics_log is not None and say is not None:
            metrics_log.write({"step": step, **metrics})
            say(progress.line(step, metrics))
        tracker.log_metrics(step, metrics)

    def extra(step: int) -> dict[str, float]:
        out = {
            "samples_per_s": progress.rate(step) * progress.samples_per_step,
            "peak_mem_mb": peak_memory_mb(device),
        }
        if rank == 0:  # counted by the data pipeline's one counter actor, so far
            out.update(bad_record_metrics(job.data, config.get("bad_records")))
        return out

    components: list[loop.Scheduled] = []
    if config.get("fault_at_step") is not None:  # tests only: not part of the job schema
        kill = KillWorker(int(config["fault_at_step"]), rank, job.cluster.num_workers, run_dir)
        kill.keep_restored(averages, state)
        components.append(kill)
    components.append(loop.LogMetrics(job.train.log_every, write_metrics, extra=extra))
    if eval_cond is not None:
        grid_args = {"rank": rank, "null_cond": null_cond}
        components += [
            SampleGrids(job, eval_cond, run_dir / "samples", grid_args, tracker),
            PeriodicEval(job, config.get("judge"), eval_cond, device, null_cond, metrics_log, say, tracker),
        ]
    components.append(CheckpointAndReport(job, rank, world))

    generator = torch.Generator(device=device).manual_seed(
        job.train.seed * 100_003 + rank * 1009 + state.step
    )
    batches = shard_batches(ray.train.get_dataset_shard("train"), job, state, rank, device, dtype)
    loop.run(
        run,
        modelling.build_objective(job),
        batches,
        null_cond=null_cond,
        generator=generator,
        components=components,
    )

    with run.sampling() as module, full_parameters(module, job.deepspeed.zero_stage):
        if rank == 0:
            modelling.export(job, module, run_dir / "export", steps=state.step)
    tracker.finish(run_dir / "export")
    if metrics_log is not None:
        metrics_log.close()
    if dist.is_initialized():
        dist.barrier()  # every rank before teardown: avoids "terminate called without an active exception"


def shard_batches(
    shard: Any, job: JobConfig, state: TrainState, rank: int, device: torch.device, dtype: torch.dtype
) -> Iterator[loop.Batch]:
    """This rank's micro-batches, epoch after epoch, from where `state` says the data stopped: a resume
    skips the batches of the current epoch already trained on. Keeps `state`'s data position current."""
    edit_job = job.data.is_edit
    while True:
        kwargs = iter_torch_kwargs(job.data, device)
        if "local_shuffle_seed" in kwargs:  # a different local shuffle each epoch and rank
            kwargs["local_shuffle_seed"] += state.epoch * 7919 + rank
        iterator = shard.iter_torch_batches(batch_size=job.train.micro_batch, drop_last=True, **kwargs)
        skip = state.batches_in_epoch
        seen = 0
        for batch in iterator:
            seen += 1
            if skip:
                skip -= 1
                continue
            x = batch["image"].to(device, dtype)
            cond = {
                "text_states": batch["text_states"].to(device, dtype),
                "text_mask": batch["text_mask"].to(device),
            }
            if edit_job:  # the source image as reference tokens (Qwen-Image-Edit layout)
                editing.add_reference(cond, batch, device, dtype)
            state.batches_in_epoch += 1
            yield x, cond
        if seen == 0:
            raise RuntimeError(
                f"rank {rank}: the training data yielded no full micro-batch of "
                f"{job.train.micro_batch} rows; check data.path and the shard sizes"
            )
        state.epoch += 1
        state.batches_in_epoch = 0


class SampleGrids:
    """`samples/step_N.png` every `eval.every` steps and `samples/final.png` at the end: one row per NFE
    (every rank samples: ZeRO-3 forwards need all ranks; rank 0 writes)."""

    def __init__(
        self,
        job: JobConfig,
        eval_cond: dict[str, torch.Tensor],
        out: Path,
        args: dict,
        tracker: tracking.JobTracker,
    ) -> None:
        self.job, self.eval_cond, self.out, self.args, self.tracker = job, eval_cond, out, args, tracker

    def _grid(self, run: loop.Loop, name: str) -> None:
        # no gathering: under ZeRO-3 the forward gathers one layer at a time on every rank
        with run.sampling() as module:
            modelling.sample_grid(self.job, module, self.eval_cond, self.out / name, **self.args)
        self.tracker.log_samples(self.out / name)

    def after_step(self, run: loop.Loop) -> None:
        step = run.state.step
        if loop.every(self.job.eval.every, step, run.final_step, at_final=False):
            self._grid(run, f"step_{step:06d}.png")

    def at_end(self, run: loop.Loop) -> None:
        self._grid(run, "final.png")


class PeriodicEval:
    """The judges' metrics every `eval.every` steps and at the last step, into metrics.jsonl and the
    next report to Ray (Tune reads them); later reports keep the latest ones."""

    def __init__(
        self,
        job: JobConfig,
        judge: str | None,
        eval_cond: dict[str, torch.Tensor],
        device: torch.device,
        null_cond: dict[str, torch.Tensor],
        metrics_log: MetricsLog | None,
        say: ProgressLog | None,
        tracker: tracking.JobTracker,
    ) -> None:
        self.job, self.eval_cond, self.device, self.null_cond = job, eval_cond, device, null_cond
        self.judge = judge  # the data's judge dataset, as the driver read it from the manifest
        self.metrics_log, self.say, self.tracker = metrics_log, say, tracker

    def after_step(self, run: loop.Loop) -> None:
        step = run.state.step
        if not loop.every(self.job.eval.every, step, run.final_step):
            return
        with run.sampling() as module:
            evaluated = modelling.eval_metrics(
                self.job,
                module,
                self.eval_cond,
                device=self.device,
                dataset=self.judge,
                null_cond=self.null_cond,
            )
        if not evaluated:
            return
        run.last_eval = evaluated
        run.latest = {**run.latest, **evaluated}
        run.unreported = True
        if self.metrics_log is not None and self.say is not None:
            self.metrics_log.write({"step": step, **evaluated})
            self.tracker.log_metrics(step, evaluated)
            self.say("eval " + " ".join(f"{k[5:]}={v:.3g}" for k, v in evaluated.items()))

    def at_end(self, run: loop.Loop) -> None:
        pass


class CheckpointAndReport:
    """Every `train.checkpoint_every` steps and at the last: each rank saves its shard and reports it
    with the latest metrics; between checkpoints, new evaluation metrics are reported alone."""

    def __init__(self, job: JobConfig, rank: int, world: int) -> None:
        self.job, self.rank, self.world = job, rank, world

    def after_step(self, run: loop.Loop) -> None:
        import ray.train

        state = run.state
        if loop.every(self.job.train.checkpoint_every, state.step, run.final_step):
            metrics = {**run.latest, "step": state.step, "samples_seen": state.samples_seen * self.world}
            checkpointing.save(run.engine.model, run.averages, state, self.rank, metrics)
        elif run.unreported:
            ray.train.report({**run.latest, "step": state.step})
        run.unreported = False

    def at_end(self, run: loop.Loop) -> None:
        pass


class KillWorker:
    """Fault injection for tests (`run_job(..., fault_at_step=N)`, never a job field): rank 1 (or 0 on
    one worker) dies for real, once, at step N."""

    def __init__(self, step: int, rank: int, num_workers: int, run_dir: Path) -> None:
        self.step, self.rank, self.run_dir = step, rank, run_dir
        self.victim = 1 if num_workers > 1 else 0

    def keep_restored(self, averages, state: TrainState) -> None:
        """On a resumed start, each rank's averages as the restore left them, saved the way a checkpoint
        saves them (`logs/restored_averages/step<N>/`): the tests compare them with the checkpoint's."""
        if state.step:
            out = self.run_dir / "logs" / "restored_averages" / f"step{state.step}"
            out.mkdir(parents=True, exist_ok=True)
            averages.save(out)

    def after_step(self, run: loop.Loop) -> None:
        marker = self.run_dir / f".injected_failure_step{self.step}"
        if run.state.step != self.step or self.rank != self.victim or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        log.warning("fault injection: rank %d exits at step %d", self.rank, self.step)
        os._exit(17)

    def at_end(self, run: loop.Loop) -> None:
        pass


def _write_pid(run_dir: Path, rank: int) -> None:
    """`logs/workers/rank<R>.pid`: which processes train this run (the driver-death test checks them)."""
    path = run_dir / "logs" / "workers" / f"rank{rank}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only; the worker reads it only on CPU

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
