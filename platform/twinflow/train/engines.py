"""The two engines the training loop (`train.loop`) drives: DeepSpeed on Ray Train workers, plain torch
AdamW in-process (recipe search, image-scale tests). One small interface, so the step is written once.

An engine owns the optimizer, gradient accumulation and clipping; the loop owns everything else (lr
schedule, teacher, objective, metrics, what happens on a schedule). `step()` says whether the optimizer
stepped: with gradient accumulation only every `gradient_accumulation_steps`-th micro-batch ends a step.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Protocol

import torch
import torch.distributed as dist

from twinflow.train.engine import full_parameters

if TYPE_CHECKING:
    from twinflow.train.sections import DeepSpeedConfig, TrainConfig


class Engine(Protocol):
    #: what the objective calls (forwards like the module; the DeepSpeed engine for DeepSpeed)
    model: Any
    #: the plain module: sampling, EMA updates, export
    module: torch.nn.Module
    rank: int
    world: int

    def set_lr(self, lr: float) -> None: ...

    def lr(self) -> float: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool: ...

    def gathered(self) -> ContextManager[None]: ...

    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]: ...


class DeepSpeedEngine:
    """A DeepSpeed engine behind the loop's interface (its own accumulation, clipping, ZeRO)."""

    def __init__(self, ds_engine: Any, zero_stage: int) -> None:
        self.model = ds_engine
        self.module = ds_engine.module
        self.zero_stage = zero_stage
        distributed = dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    @property
    def global_steps(self) -> int:
        return int(self.model.global_steps)

    def set_lr(self, lr: float) -> None:
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr

    def lr(self) -> float:
        return float(self.model.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> bool:
        before = self.model.global_steps
        self.model.step()
        return self.model.global_steps != before

    def gathered(self) -> ContextManager[None]:
        """Whole parameters on every rank (ZeRO-3 shards them) for EMA updates, sampling, export."""
        return full_parameters(self.module, self.zero_stage)

    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the ranks that have it: with the global group split a rank may
        have had no rows of a group since the last log (no `loss_adv` there)."""
        if self.world == 1:
            return values
        names: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(names, sorted(values))
        keys = sorted(set().union(*names))
        t = torch.tensor(
            [[values.get(k, 0.0), float(k in values)] for k in keys], dtype=torch.float64
        ).reshape(-1, 2)
        dist.all_reduce(t)
        return {k: s / n for k, (s, n) in zip(keys, t.tolist()) if n > 0}


class TorchEngine:
    """torch AdamW with the job's lr, betas, weight decay, clipping and gradient accumulation: what
    DeepSpeed does at ZeRO-0 in fp32 on one rank (the loss is divided by the accumulation count, as
    DeepSpeed's backward does, and gradients are clipped by their global norm before the step)."""

    def __init__(
        self,
        module: torch.nn.Module,
        params: Iterable[torch.nn.Parameter],
        train: TrainConfig,
        ds: DeepSpeedConfig,
    ) -> None:
        self.model = self.module = module
        self.rank, self.world = 0, 1
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
        )
        self.accumulation = ds.gradient_accumulation_steps
        self.clip = ds.gradient_clipping
        self._micro = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.accumulation:
            return False
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def gathered(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return values
