"""Activation memory, measured on small configs on the CPU and fitted to a per-layer per-token formula.

Three quantities per batch row, in bytes, fitted separately for each training precision (fp32 and
bf16: in bf16 not everything halves, the norms, time embeddings and rotary tables stay fp32):

- **saved**: what a forward with gradient leaves alive for its backward (each storage once,
  parameters excluded). With activation checkpointing it is the checkpoints; the backward then
  recomputes one block at a time, whose activations (the per-layer terms of the plain formula)
  come on top.
- **backward**: the backward's own working set on top of what was saved (incoming gradients and
  temporaries; with checkpointing, on top of the recomputed block). Parameter gradients are not in
  it (they are model states).
- **transient**: the peak of live tensors a no-grad forward creates (a `TorchDispatchMode` counts
  every new storage until it is freed). TwinFlow's extra passes run without gradient, so their
  activations are freed layer by layer and only this working set counts.

saved is fitted by least squares as `a*L*N*d + b*N*d + c*L*d + e*L*N*h` (L layers, N image + text
tokens, d width, h heads), which also captures the per-row modulation vectors; backward and transient,
which do not grow with depth (blocks run one at a time), as `a*N*d + b*N*h + c*d + e*L*d`. Attention
here is SDPA (flash/memory-efficient on GPU, the fused CPU kernel here): nothing grows with N^2.

- **text path**: before the first block the caption states (T tokens at the text encoder's width J:
  3584 for Qwen2.5-VL, whatever the model width) go through the family's text input (Qwen-Image: an
  RMSNorm that upcasts to fp32, then the projection to d). Its no-grad peak scales with T*J, not
  with N*d, so it gets its own fit, `a*T*J + b*Ni*d` (Ni image tokens, whose embedding is alive
  then), measured with the text input fed at width J as a native encoder feeds it. A no-grad forward's
  peak is the larger of the two phases: the text path, or the blocks' working set.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from twinflow.models.config import ModelConfig

# The model modules (diffusers' transformer classes, presets, the published-config helpers) load inside
# the functions that build or count a model: `twinflow plan --help` and the report's pure arithmetic
# (memory.py imports this module for its fitted figures) stay free of diffusers.

#: (layers, heads, head_dim, image size at patch 2, text tokens) of the configs the formula is fitted on
FIT_CONFIGS = (
    (1, 2, 32, 16, 8),
    (6, 1, 64, 16, 8),
    (2, 2, 32, 32, 8),
    (4, 8, 8, 16, 16),
    (3, 2, 64, 24, 8),
    (2, 4, 16, 24, 4),
    (1, 4, 32, 32, 16),
    (8, 2, 16, 24, 16),
)
ROWS = 2  # batch rows per measurement (results are per row)


def features(layers: int, tokens: int, width: int, heads: int) -> np.ndarray:
    """Terms of the saved-activation formula (per row)."""
    return np.array(
        [layers * tokens * width, tokens * width, layers * width, layers * tokens * heads], dtype=np.float64
    )


def transient_features(layers: int, tokens: int, width: int, heads: int) -> np.ndarray:
    """Terms of the no-grad working set: blocks run one at a time, so nothing scales with L*N."""
    return np.array([tokens * width, tokens * heads, width, layers * width], dtype=np.float64)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def probe_config(
    family: str, layers: int, heads: int, head_dim: int, size: int, text: int, checkpointing: bool
) -> ModelConfig:
    """A small random-init config of `family` with the given shape (patch 2, 4 channels)."""
    from twinflow.models.presets import PRESETS

    preset = next(iter(PRESETS[family].values()))
    dims = {"num_layers": layers, "num_attention_heads": heads, "attention_head_dim": head_dim}
    if family == "qwen_image":
        rope = head_dim // 4
        dims["axes_dims_rope"] = [head_dim - 2 * rope, rope, rope]
    return ModelConfig(
        family=family,
        preset=preset.name,
        image_size=size,
        channels=4,
        patch=2,
        text_max_length=text,
        backbone=dims,
        gradient_checkpointing=checkpointing,
    )


@dataclass(frozen=True)
class Measured:
    saved: int  # bytes per row kept for the backward
    backward: int  # peak bytes per row the backward adds to what was saved
    transient: int  # peak bytes per row of a no-grad forward
    layers: int
    tokens: int
    width: int
    heads: int


def _inputs(gen, rows: int, text: int, dtype: torch.dtype = torch.float32):
    c, h, w = gen.sample_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, h, w, generator=g).to(dtype)
    t = torch.rand(rows, generator=g).to(dtype)
    cond = {
        "text_states": torch.randn(rows, text, 384, generator=g).to(dtype),
        "text_mask": torch.ones(rows, text, dtype=torch.int64),
    }
    return x, t, 0.5 * t, cond


def saved_and_backward_bytes(gen, inputs) -> tuple[int, int]:
    """(bytes one forward with gradient leaves alive for its backward, output excluded; peak bytes its
    backward adds on top). Parameters and their gradients were made before the meter (the gradients
    are preallocated, so accumulating into them adds only the incoming temporaries), so neither is
    counted. Counting live storages instead of only `saved_tensors_hooks` also catches the block
    inputs that activation checkpointing holds."""
    gen.train()
    for p in gen.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    meter = LiveBytes()
    with meter:
        out = gen(*inputs)
        kept = meter.alive - out.untyped_storage().nbytes()
        base = meter.alive
        meter.peak = base
        out.float().square().mean().backward()
        extra = meter.peak - base
    del out
    gen.zero_grad(set_to_none=True)
    return kept, extra


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are still alive; keeps the peak.

    Storages are tracked by weak reference (a view or a tensor autograd keeps holds its storage alive
    even after the Python tensor that made it is gone) and swept after every op."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self._refs.items() if ref.expired()]:
            self.live -= self._refs.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._sweep()
        # an output sharing an input's storage (a view, a no-op cast; often of a parameter) is no new memory
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr and ptr not in self._refs and ptr not in inputs:
                    self._refs[ptr] = (StorageWeakRef(s), s.nbytes())
                    self.live += s.nbytes()
        self.peak = max(self.peak, self.live)
        return out

    @property
    def alive(self) -> int:
        self._sweep()
        return self.live


def transient_bytes(gen, inputs) -> int:
    gen.eval()
    meter = LiveBytes()
    with torch.no_grad(), meter:
        out = gen(*inputs)
    del out
    return meter.peak


def measure(cfg: ModelConfig, rows: int = ROWS, precision: str = "fp32") -> Measured:
    """Per-row saved, backward and transient activation bytes of `cfg`, built in `precision` and run
    for real on the CPU."""
    from twinflow.models import build_generator

    dtype = PRECISIONS[precision]
    torch.manual_seed(0)
    gen = build_generator(cfg, dtype=dtype)
    inputs = _inputs(gen, rows, cfg.text_max_length, dtype)
    saved, backward = saved_and_backward_bytes(gen, inputs)
    transient = transient_bytes(gen, inputs)
    c = gen.backbone.config
    heads = int(c.num_attention_heads)
    _, h, w = gen.sample_shape
    return Measured(
        saved=saved // rows,
        backward=backward // rows,
        transient=transient // rows,
        layers=int(c.num_layers),
        tokens=(h // gen.patch) * (w // gen.patch) + cfg.text_max_length,
        width=heads * int(c.attention_head_dim),
        heads=heads,
    )


#: (text tokens, text width J, image size at patch 2, layers, heads, head_dim) of the text-path fit
TEXT_PATH_CONFIGS = (
    (8, 256, 16, 1, 2, 32),
    (32, 512, 16, 1, 2, 32),
    (64, 1024, 16, 2, 2, 16),
    (16, 2048, 24, 1, 4, 16),
    (48, 768, 32, 1, 2, 64),
)


def text_path_features(text_tokens: int, text_width: int, image_tokens: int, width: int) -> np.ndarray:
    """Terms of the text path's no-grad peak (per row)."""
    return np.array([text_tokens * text_width, image_tokens * width], dtype=np.float64)


def text_path_bytes(gen, rows: int, text: int, dtype: torch.dtype) -> int:
    """Peak bytes of a no-grad forward before its first transformer block runs, with the caption
    states fed at the backbone's own text width (as a native encoder feeds them; a learned text
    projection is bypassed). Inputs are made before the meter, as in `transient_bytes`."""
    from twinflow.plan.counts import _blocks

    fam = gen.family
    width = fam.text_dim(gen.backbone)
    c, h, w = gen.sample_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, h, w, generator=g).to(dtype)
    states = torch.randn(rows, text, width, generator=g).to(dtype)
    mask = torch.ones(rows, text, dtype=torch.int64)
    timestep = torch.rand(rows, generator=g).to(dtype)
    from twinflow.models.time_embed import pack_times

    times = pack_times(timestep, 0.5 * timestep, gen.time_scale)
    meter = LiveBytes()
    seen: list[int] = []

    def before_blocks(module, args):
        seen.append(meter.peak)
        raise _Stop

    hook = _blocks(gen.backbone)[0].register_forward_pre_hook(before_blocks)
    gen.eval()
    try:
        with torch.no_grad(), meter:
            fam.forward(gen.backbone, x, times, states, mask, None)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen[0]


class _Stop(Exception):
    """Ends a metered forward at its first block."""


@functools.lru_cache(maxsize=8)
def fit_text_path(family: str, precision: str = "fp32") -> tuple[float, ...]:
    """Measure `TEXT_PATH_CONFIGS` in `precision` and fit the text path's per-row no-grad peak."""
    from twinflow.models import build_generator

    dtype = PRECISIONS[precision]
    feats, values = [], []
    for text, text_width, size, layers, heads, head_dim in TEXT_PATH_CONFIGS:
        cfg = probe_config(family, layers, heads, head_dim, size, text, False)
        cfg = cfg.model_copy(update={"backbone": {**cfg.backbone, _TEXT_WIDTH_KEY[family]: text_width}})
        torch.manual_seed(0)
        gen = build_generator(cfg, dtype=dtype)
        _, h, w = gen.sample_shape
        image_tokens = (h // gen.patch) * (w // gen.patch)
        feats.append(text_path_features(text, text_width, image_tokens, heads * head_dim))
        values.append(text_path_bytes(gen, ROWS, text, dtype) // ROWS)
    return nonnegative_fit(feats, values)


#: the diffusers config key of each family's text input width
_TEXT_WIDTH_KEY = {"qwen_image": "joint_attention_dim", "sana": "caption_channels"}


_PER_LAYER = np.array([1.0, 0.0, 1.0, 1.0])  # which `features` terms belong to the layers


@dataclass(frozen=True)
class Coefficients:
    """Fitted bytes per feature unit for one family at one precision."""

    saved: tuple[float, ...]
    saved_ckpt: tuple[float, ...]
    backward: tuple[float, ...]
    backward_ckpt: tuple[float, ...]  # on top of the recomputed block
    transient: tuple[float, ...]
    text_path: tuple[float, ...] = (0.0, 0.0)  # the no-grad peak before the first block


@dataclass(frozen=True)
class PerRow:
    """Bytes per batch row of one step's activations (see the module docstring)."""

    saved: int  # held from the forward with gradient until its backward
    backward: int  # on top of `saved` during the backward (the recomputed block included)
    transient: int  # a no-grad forward's peak


@dataclass(frozen=True)
class ActivationModel:
    """Fitted coefficients for one family, per training precision."""

    family: str
    fits: dict[str, Coefficients]

    def per_row(
        self,
        layers: int,
        tokens: int,
        width: int,
        heads: int,
        checkpointing: bool,
        precision: str = "fp32",
        text: tuple[int, int, int] | None = None,
    ) -> PerRow:
        """`text`: (text tokens, text width J, image tokens) for the text path (None: not counted)."""
        if precision not in self.fits:
            raise ValueError(f"no activation fit for {self.family} at precision {precision!r}")
        k = self.fits[precision]
        shape = (layers, tokens, width, heads)
        flat = transient_features(*shape)
        transient = flat @ np.array(k.transient)
        if text is not None:  # the text path runs before the blocks: the larger phase is the peak
            transient = max(transient, text_path_features(*text, width) @ np.array(k.text_path))
        if checkpointing:  # the checkpoints; the backward recomputes one block at a time on top
            saved = features(*shape) @ np.array(k.saved_ckpt)
            block = features(1, tokens, width, heads) @ (np.array(k.saved) * _PER_LAYER)
            backward = block + flat @ np.array(k.backward_ckpt)
        else:
            saved = features(*shape) @ np.array(k.saved)
            backward = flat @ np.array(k.backward)
        return PerRow(int(saved), int(backward), int(transient))


def nonnegative_fit(rows: list[np.ndarray], values: list[int]) -> tuple[float, ...]:
    """Least squares with every coefficient >= 0 (active set: drop the most negative term, refit), so
    no term can turn negative when the formula is extrapolated to 60 layers and 4k tokens."""
    a, y = np.stack(rows), np.array(values, dtype=np.float64)
    active = list(range(a.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if coef.min() >= 0:
            out = np.zeros(a.shape[1])
            out[active] = coef
            return tuple(float(c) for c in out)
        active.pop(int(coef.argmin()))


@functools.lru_cache(maxsize=8)
def fit(
    family: str, precision: str = "fp32", configs: tuple[tuple[int, ...], ...] = FIT_CONFIGS
) -> Coefficients:
    """Measure `configs` (without and with checkpointing) in `precision` and fit the formulas."""
    shapes, saved, saved_ckpt, backward, backward_ckpt, transient = [], [], [], [], [], []
    for layers, heads, head_dim, size, text in configs:
        plain = measure(probe_config(family, layers, heads, head_dim, size, text, False), precision=precision)
        ckpt = measure(probe_config(family, layers, heads, head_dim, size, text, True), precision=precision)
        shapes.append((plain.layers, plain.tokens, plain.width, plain.heads))
        saved.append(plain.saved)
        saved_ckpt.append(ckpt.saved)
        backward.append(plain.backward)
        backward_ckpt.append(ckpt.backward)
        transient.append(plain.transient)
    feats = [features(*shape) for shape in shapes]
    tfeats = [transient_features(*shape) for shape in shapes]
    plain_saved = nonnegative_fit(feats, saved)
    # the recomputed block is the per-layer share of the plain fit; what the backward adds on top
    # of it is fitted on its own
    block = [features(1, n, d, h) @ (np.array(plain_saved) * _PER_LAYER) for _, n, d, h in shapes]
    rest = [max(0.0, b - k) for b, k in zip(backward_ckpt, block, strict=True)]
    return Coefficients(
        saved=plain_saved,
        saved_ckpt=nonnegative_fit(feats, saved_ckpt),
        backward=nonnegative_fit(tfeats, backward),
        backward_ckpt=nonnegative_fit(tfeats, rest),
        transient=nonnegative_fit(tfeats, transient),
        text_path=fit_text_path(family, precision),
    )


FIT_FILE = Path(__file__).with_name("activation_fit.json")


_FIELDS = ("saved", "saved_ckpt", "backward", "backward_ckpt", "transient", "text_path")


def load_fit(family: str, path: Path = FIT_FILE) -> ActivationModel:
    """The stored fits for `family` (written by `python -m twinflow.plan.activations --write`)."""
    fits = json.loads(path.read_text()) if path.is_file() else {}
    if family not in fits:
        raise ValueError(
            f"no activation fit for model family {family!r} in {path}; measure one with "
            f"`python -m twinflow.plan.activations --family {family} --write`"
        )
    f = fits[family]
    return ActivationModel(
        family,
        {p: Coefficients(*(tuple(f[p][k]) for k in _FIELDS if k in f[p])) for p in PRECISIONS if p in f},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="measure small configs on the CPU and fit the activation formulas (fp32 and bf16)"
    )
    parser.add_argument("--family", action="append", default=None, help="default: qwen_image")
    parser.add_argument("--write", action="store_true", help=f"store the fit in {FIT_FILE.name}")
    parser.add_argument(
        "--text-path-only", action="store_true", help="refit only the text path (seconds), keep the rest"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fits = json.loads(FIT_FILE.read_text()) if FIT_FILE.is_file() else {}
    for family in args.family or ["qwen_image"]:
        if args.text_path_only:
            entry = fits[family]
        else:
            entry = {"configs": [list(c) for c in FIT_CONFIGS]}
            for precision in PRECISIONS:
                k = fit(family, precision)
                entry[precision] = {name: list(getattr(k, name)) for name in _FIELDS}
        entry["text_path_configs"] = [list(c) for c in TEXT_PATH_CONFIGS]
        if args.text_path_only:
            for precision in PRECISIONS:
                entry[precision]["text_path"] = list(fit_text_path(family, precision))
        fits[family] = entry
        print(family, json.dumps(entry))
    if args.write:
        FIT_FILE.write_text(json.dumps(fits, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
