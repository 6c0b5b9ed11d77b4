"""The training step, written once for both engines (`train.engines`): Ray Train workers under DeepSpeed
(`train.worker`) and in-process runs (`train.inprocess`).

    for each micro-batch:
        first micro-batch of a step: lr warm-up, teacher update (one EMA update per optimizer step)
        loss = objective(engine.model, x, cond, teacher, null_cond)
        engine.backward(loss); engine.step()          # the engine accumulates and clips
        after an optimizer step: sampling EMA update, then every scheduled component

What happens on a schedule (logging, checkpoints, sample grids, periodic evaluation) is a component that
decides its own timing (`due(step)`), as in torchtitan's trainer: the loop only calls them in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol

import torch
from torch import Tensor

from twinflow.method.groups import BatchLayout
from twinflow.train.checkpointing import TrainState
from twinflow.train.engines import Engine
from twinflow.train.schedule import lr_factor

Batch = tuple[Tensor, dict[str, Tensor]]


@dataclass
class StepTimes:
    """Where a worker's wall time goes: waiting for data, computing steps; CPU seconds of the process."""

    data_wait: float = 0.0
    compute: float = 0.0
    micro_batches: int = 0
    first_wait: float | None = None  # pipeline start-up (read, embed actors): not steady-state wait
    t_first: float = field(default_factory=time.perf_counter)
    cpu_first: float = field(default_factory=time.process_time)

    def waited(self, seconds: float) -> None:
        if self.first_wait is None:
            self.first_wait = seconds
            self.t_first, self.cpu_first = time.perf_counter(), time.process_time()
        else:
            self.data_wait += seconds

    def metrics(self) -> dict[str, float]:
        return {
            "data_wait_frac": self.data_wait / max(self.compute + self.data_wait, 1e-9),
            "data_startup_s": self.first_wait or 0.0,
            "step_s": self.compute / max(self.micro_batches, 1),
            "elapsed_s": time.perf_counter() - self.t_first,  # wall since the first batch
            # this process's CPU seconds since the first batch (all its threads): a step's cost that
            # other processes on a shared machine do not inflate
            "cpu_s": time.process_time() - self.cpu_first,
        }


@dataclass
class Loop:
    """What the scheduled components see: the engine, the averages, the step state and the latest
    metrics (rank-averaged training metrics merged with the latest evaluation)."""

    job: Any
    engine: Engine
    averages: Any
    state: TrainState
    times: StepTimes = field(default_factory=StepTimes)
    window: dict[str, list[float]] = field(default_factory=dict)
    latest: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    #: metrics logged since the last report to Ray (the checkpoint component reports them)
    unreported: bool = False
    #: the group split each optimizer step realises (TwinFlow), logged with every metrics row
    realised: dict[str, float] = field(default_factory=dict)

    @property
    def layout(self) -> BatchLayout:
        """The optimizer step's global batch: ranks x micro-batch x accumulation."""
        return BatchLayout(
            self.engine.world, self.job.train.micro_batch, self.job.deepspeed.gradient_accumulation_steps
        )

    @property
    def final_step(self) -> int:
        return int(self.job.train.steps)

    @property
    def at_end(self) -> bool:
        return self.state.step >= self.final_step

    def sampling(self) -> ContextManager[torch.nn.Module]:
        """The module grids, judge metrics and the export sample from, holding the sampling EMA when
        the job keeps one (every rank enters: under ZeRO-3 it gathers layer by layer as in training)."""
        return self.averages.sampling()

    def take_window(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.window.items()}
        self.window.clear()
        return means


class Scheduled(Protocol):
    """A part of training that runs on its own schedule after optimizer steps, and once at the end."""

    def after_step(self, loop: Loop) -> None: ...

    def at_end(self, loop: Loop) -> None: ...


def every(n: int, step: int, final: int, *, at_final: bool = True) -> bool:
    """Due at multiples of `n` (0 = never) and, with `at_final`, at the last step."""
    return (bool(n) and step % n == 0) or (at_final and step == final)


def run(
    loop: Loop,
    objective: Callable[..., Any],
    batches: Iterable[Batch],
    *,
    null_cond: Mapping[str, Tensor] | None,
    generator: torch.Generator,
    components: Iterable[Scheduled] = (),
) -> TrainState:
    """Train from `loop.state.step` to `job.train.steps` on `batches` (micro-batches), then call every
    component's `at_end`. Returns the state (step, samples seen; data position is the source's)."""
    job, engine, state, times = loop.job, loop.engine, loop.state, loop.times
    components = list(components)
    teacher = loop.averages.teacher
    layout = loop.layout
    slot_split = getattr(objective, "slot_split", None)  # objectives with row groups (TwinFlow)
    if slot_split is not None:
        loop.realised = objective.realised(layout)
    micro = 0
    it: Iterator[Batch] = iter(batches)
    while not loop.at_end:
        t_wait = time.perf_counter()
        try:
            x, cond = next(it)
        except StopIteration:
            break
        t_start = time.perf_counter()
        times.waited(t_start - t_wait)
        if micro == 0:  # the first micro-batch of an optimizer step: EMA before any target
            engine.set_lr(job.train.lr * lr_factor(state.step, job.train.warmup_steps))
            loop.averages.update_teacher()
        rows = {}
        if slot_split is not None:  # this rank's and micro-batch's part of the step's global split
            rows["split"] = slot_split(layout, state.step, engine.rank, micro, job.train.seed)
            rows["lockstep"] = engine.world > 1  # ranks hold different rows but make the same calls
        out = objective(
            engine.model,
            x,
            cond,
            teacher=teacher,
            null_cond=null_cond,
            generator=generator,
            update_teacher=False,
            **rows,
        )
        engine.backward(out.loss)
        stepped = engine.step()
        micro += 1
        state.samples_seen += int(x.shape[0])
        for k, v in out.metrics.items():
            loop.window.setdefault(k, []).append(float(v))
        times.compute += time.perf_counter() - t_start
        times.micro_batches += 1
        if not stepped:  # mid gradient accumulation
            continue
        micro = 0
        state.step += 1
        loop.averages.update_sampling()
        for c in components:
            c.after_step(loop)
    for c in components:
        c.at_end(loop)
    return state


class LogMetrics:
    """Every `train.log_every` steps (and the last): the window's means averaged across ranks, with lr,
    timing and `extra(step)`, handed to `sink` (rank 0 writes metrics.jsonl / TensorBoard and the progress line; an
    in-process run keeps a history)."""

    def __init__(
        self,
        every_n: int,
        sink: Callable[[int, dict[str, float]], None] | None,
        *,
        extra: Callable[[int], dict[str, float]] | None = None,
    ) -> None:
        self.every_n, self.sink, self.extra = every_n, sink, extra

    def after_step(self, loop: Loop) -> None:
        step = loop.state.step
        if not every(self.every_n, step, loop.final_step):
            return
        metrics = loop.engine.mean_across_ranks(loop.take_window())
        metrics["lr"] = loop.engine.lr()
        metrics.update(loop.realised)
        if self.extra is not None:
            metrics.update(self.extra(step))
        metrics.update(loop.times.metrics())
        loop.latest = {**metrics, **loop.last_eval}
        if self.sink is not None:
            self.sink(step, metrics)

    def at_end(self, loop: Loop) -> None:
        pass


class Callback:
    """`fn(step, loop)` after every optimizer step (in-process evaluation hooks)."""

    def __init__(self, fn: Callable[[int, Loop], None]) -> None:
        self.fn = fn

    def after_step(self, loop: Loop) -> None:
        self.fn(loop.state.step, loop)

    def at_end(self, loop: Loop) -> None:
        pass
