"""The teacher G_hat used for targets: an EMA copy, the online model itself, or the frozen initial model.

EMA warm-up (reference behaviour): the k-th update uses decay d_k with d_0 = 0 (the first update copies
the online weights) and d_{k+1} = d_k + 0.5 (1 - d_k)(d - d_k), so the decay climbs smoothly to d
instead of averaging in the random early weights for hundreds of steps.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, ContextManager, Literal, Mapping

import torch
from torch import Tensor, nn

TeacherMode = Literal["ema", "online", "frozen"]
TEACHER_MODES: tuple[str, ...] = ("ema", "online", "frozen")


def next_decay(current: float, target: float) -> float:
    """One warm-up step: d_k <- d_k + 0.5 (1 - d_k)(d - d_k)."""
    return current + 0.5 * (1.0 - current) * (target - current)


class EMA:
    """Exponential moving average of a module's trainable parameters (buffers are copied)."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.current_decay = 0.0
        self.num_updates = 0
        self.module = copy.deepcopy(source).requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """ema <- d_k ema + (1 - d_k) online, then advance d_k. Frozen parameters are skipped:
        they never change, so the copy already equals them."""
        ema_params = dict(self.module.named_parameters())
        pairs = [(ema_params[name], p.detach()) for name, p in source.named_parameters() if p.requires_grad]
        if pairs:
            dst = [a for a, _ in pairs]
            src = [b.to(device=a.device, dtype=a.dtype) for a, b in pairs]
            torch._foreach_lerp_(dst, src, 1.0 - self.current_decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in source.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(b)
        self.num_updates += 1
        self.current_decay = next_decay(self.current_decay, self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "current_decay": self.current_decay,
            "num_updates": self.num_updates,
            "module": self.module.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.current_decay = float(state["current_decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


class Teacher:
    """Callable `teacher(x, t, r, cond)` under no_grad, in one of three modes.

    - "ema": a deep copy updated from the online model by `update()` every step, before targets.
    - "online": the online model itself (decay 0); no copy, no memory. `is_online` lets the objective
      merge teacher forwards into the online model's no-grad calls.
    - "frozen": the initial model (decay 1). With `adapters_off` (a context-manager factory, e.g. a
      peft "adapters disabled" context) it is the online module with adapters off: no copy either.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "online",
        *,
        decay: float = 0.99,
        adapters_off: Callable[[], ContextManager[Any]] | None = None,
    ) -> None:
        if mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {mode!r}; choose one of {list(TEACHER_MODES)}")
        if adapters_off is not None and mode != "frozen":
            raise ValueError("adapters_off only applies to the 'frozen' teacher mode")
        self.mode = mode
        self.online = model
        self.adapters_off = adapters_off
        self.ema: EMA | None = EMA(model, decay) if mode == "ema" else None
        self.frozen: nn.Module | None = None
        if mode == "frozen" and adapters_off is None:
            self.frozen = copy.deepcopy(model).requires_grad_(False)

    @property
    def is_online(self) -> bool:
        return self.mode == "online"

    @property
    def decay(self) -> float:
        """Decay used by the most recent update (0 online, 1 frozen)."""
        if self.ema is not None:
            return self.ema.current_decay
        return 0.0 if self.mode == "online" else 1.0

    @property
    def module(self) -> nn.Module:
        """The module whose weights the teacher evaluates."""
        if self.ema is not None:
            return self.ema.module
        if self.frozen is not None:
            return self.frozen
        return self.online

    def update(self) -> None:
        if self.ema is not None:
            self.ema.update(self.online)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        ctx = self.adapters_off() if self.adapters_off is not None else contextlib.nullcontext()
        module = self.module
        own = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
        if own == x.dtype:
            with ctx:
                return module(x, t, r, dict(cond))
        # An EMA/frozen copy keeps fp32 weights while the online model trains in bf16 (DeepSpeed casts
        # it): a bf16 EMA could not take steps of (1 - d) * delta, which round away in 8 mantissa bits.
        cast = {k: v.to(own) if v.is_floating_point() else v for k, v in cond.items()}
        with ctx:
            return module(x.to(own), t.to(own), r.to(own), cast).to(x.dtype)

    def export_weights(self) -> dict[str, Tensor]:
        """The teacher's own weights (the EMA weights in "ema" mode), detached copies."""
        if self.mode == "online" or self.adapters_off is not None:
            raise ValueError(f"the {self.mode!r} teacher has no weights of its own to export")
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the EMA (or the frozen initial weights, which a resumed run could not
        otherwise recover from the online model)."""
        state: dict[str, Any] = {"mode": self.mode}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.frozen is not None:
            state["frozen"] = self.frozen.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint teacher mode {state.get('mode')!r} != configured {self.mode!r}")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.frozen is not None:
            self.frozen.load_state_dict(state["frozen"])
