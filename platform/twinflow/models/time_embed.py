"""The two-time embedder: `temb = E1(t) + (t - r) * E2(r)` inside an unmodified diffusers forward.

How r reaches the embedder: the generator hands the backbone a timestep tensor of shape (B, 2)
holding `[t * scale, t - r]` instead of the usual (B,) `t * scale`. The families we wrap pass the
timestep straight to their embedding module (Qwen-Image only casts it and, with `zero_cond_t`,
concatenates zero rows, which stay valid pairs), so nothing else in the forward sees the extra
column. The pair is ordinary forward input: nothing is stored on a module between calls, so
no_grad, autograd, activation checkpointing (recompute sees the same input), ZeRO-3 parameter hooks
and concurrent threads all work without special care. A plain (B,) timestep means r = t and runs E1
alone, i.e. exactly the base model.

Why a class swap rather than a wrapper module: E1 keeps its own parameter names, so the backbone's
state dict stays loadable by plain diffusers (E2 lives under an extra `twin_e2.` prefix that plain
diffusers ignores), and `isinstance` checks in diffusers still hold.

Fake-branch start (`fake_branch`): "signed" (the reference) feeds the signed t to E1, so at the start of a
fine-tune the negative ("fake") branch answers whatever the base does at a time it never saw. "mirror"
feeds |t| and |r| and adds a sign embedding for t < 0: S(|t|) times a zero-initialised gate, so the fake
branch starts exactly equal to the real one (dv = 0 at step 0) and learns only the difference. S and its
gate live inside E2 (`twin_e2.twin_sign`) so they are saved and loaded with E2.

Units: `t - r` multiplies E2 in our units (t in [-1, 1]); E2 sees r in the backbone's own units
(`r * scale`, e.g. 0..1000 for SANA), exactly like E1 sees t.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Literal

import torch
from torch import nn

E2Init = Literal["copy", "random"]
FakeBranch = Literal["signed", "mirror"]
E2_PREFIX = "twin_e2"
SIGN_NAME = "twin_sign"


class SignEmbedding(nn.Module):
    """`gate * S(|t|)` with S a copy of E1 and `gate` zero at init: exactly zero until trained."""

    def __init__(self, e1_copy: nn.Module, width: int) -> None:
        super().__init__()
        self.embed = e1_copy
        self.gate = nn.Parameter(torch.zeros(width))

    def forward(self, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.embed(timestep, *args, **kwargs)
        return out * self.gate.to(out.dtype)


def pack_times(t: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """(B,) t and r in our units -> the (B, 2) backbone timestep `[t * scale, t - r]`."""
    if t.shape != r.shape or t.ndim != 1:
        raise ValueError(f"t and r must both have shape (B,), got {tuple(t.shape)} and {tuple(r.shape)}")
    t = t.float()
    return torch.stack([t * scale, t - r.float()], dim=-1)


def split_times(timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of `pack_times` as seen by the embedder: (t in backbone units, t - r or None)."""
    if timestep.ndim == 1:
        return timestep, None
    if timestep.ndim == 2 and timestep.shape[-1] == 2:
        return timestep[:, 0], timestep[:, 1]
    raise ValueError(
        f"two-time embedder: timestep must have shape (B,) or (B, 2), got {tuple(timestep.shape)}"
    )


class TwoTimeMixin(nn.Module):
    """Put first in the bases of a subclass of a diffusers timestep-embedding module.

    The base class's forward must take the timestep as its first argument and return the embedding
    (B, D); the other arguments (hidden states for dtype, batch size, ...) are passed to E1 and E2 alike.
    """

    twin_e2: nn.Module
    twin_time_scale: float

    def forward(self, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        t_backbone, gap = split_times(timestep)
        sign = getattr(self.twin_e2, SIGN_NAME, None)
        if sign is None:
            base = super().forward(t_backbone, *args, **kwargs)
        else:
            negative = t_backbone < 0
            t_abs = t_backbone.abs()
            base = super().forward(t_abs, *args, **kwargs)
            base = base + negative.to(base.dtype)[:, None] * sign(t_abs, *args, **kwargs)
        if gap is None:
            return base
        # r in fp32 even when the forward cast the pair to bf16: t - r may be far below t's resolution.
        r_backbone = t_backbone.float() - gap.float() * self.twin_time_scale
        if sign is not None:
            r_backbone = r_backbone.abs()
        extra = self.twin_e2(r_backbone, *args, **kwargs)
        return base + gap.to(base.dtype)[:, None] * extra


def _init_small_random(module: nn.Module, std: float = 0.02) -> None:
    """Small random weights, zero biases: the r-path starts as a small perturbation of E1(t)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ordinary parameters. Built inside `deepspeed.zero.Init` the source is already
    partitioned: it is gathered for the copy (one embedder), and the copy's plain weights are
    partitioned by `deepspeed.initialize` like any other."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return copy.deepcopy(module)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        out = copy.deepcopy(module)
        for m in out.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m.register_parameter(name, nn.Parameter(p.data.clone(), requires_grad=p.requires_grad))
    return out


def install_two_time(
    module: nn.Module,
    twin_cls: type,
    *,
    e2_init: E2Init,
    time_scale: float,
    fake_branch: FakeBranch = "signed",
    width: int | None = None,
) -> nn.Module:
    """Turn the embedding module E1 into E1 + (t - r) E2 in place (plus the sign embedding for
    `fake_branch="mirror"`, whose gate has `width` = the embedding width); returns it."""
    if isinstance(module, TwoTimeMixin):
        raise ValueError(f"{type(module).__name__} already has a second time embedder")
    if not (issubclass(twin_cls, TwoTimeMixin) and issubclass(twin_cls, type(module))):
        raise TypeError(f"{twin_cls.__name__} must subclass TwoTimeMixin and {type(module).__name__}")
    if e2_init not in ("copy", "random"):
        raise ValueError(f"e2_init must be 'copy' or 'random', got {e2_init!r}")
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if fake_branch not in ("signed", "mirror"):
        raise ValueError(f"fake_branch must be 'signed' or 'mirror', got {fake_branch!r}")
    if fake_branch == "mirror" and not width:
        raise ValueError("fake_branch='mirror' needs the embedding width for its gate")
    e2 = _plain_copy(module)
    if e2_init == "random":
        _init_small_random(e2)
    if fake_branch == "mirror":
        e2.add_module(SIGN_NAME, SignEmbedding(_plain_copy(module), int(width)))
    module.__class__ = twin_cls
    module.twin_e2 = e2
    module.twin_time_scale = float(time_scale)
    return module


def fake_branch_of(model: nn.Module) -> FakeBranch:
    """ "mirror" when the model's time embedder has a sign embedding, else "signed"."""
    return "mirror" if any(hasattr(m.twin_e2, SIGN_NAME) for _, m in two_time_modules(model)) else "signed"


def two_time_modules(model: nn.Module) -> Iterator[tuple[str, TwoTimeMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, TwoTimeMixin):
            yield name, m


def e2_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every E2 in `model` (its own parameters, LoRA layers included if any)."""
    for name, p in model.named_parameters():
        if f".{E2_PREFIX}." in f".{name}":
            yield name, p
