"""The model side of serving, as plain torch (no Ray): load exports, encode prompts, sample batches.

A model is sampled the way `twinflow eval` and the demo sample the same export: the sampler of its
method (`Export.settings`: TwinFlow's few-step presets, a flow-matching base's ODE at r = t) with the
CFG its export recommends unless the request names one, and the seed's noise (`seeded_noise`,
`renoise_generator`), so the same export, prompt, seed and NFE give the same image everywhere.

Determinism contract: a request's images depend only on (model, prompt, nfe, seed, num_images,
guidance, image), never on the requests it is batched with. Three things make that hold:

- each request's rows draw their initial and re-noising noise from the request's own seed
  (`twinflow.method.sampler.sample` with one `row_groups` entry per request);
- prompts are encoded one at a time (and then cached), so their states never depend on batch mates;
- CPU kernels may round differently at some batch sizes (the tiny Qwen-Image backbone: batches of 1-3
  rows differ from larger ones by ~1e-6). `RowStableModel` finds, once per model, the batch sizes
  whose rows are bit-identical to every other such size and pads every call up to one of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from twinflow.export_reader import Export, open_export, shared_text_encoder
from twinflow.imaging import to_uint8
from twinflow.method.sampler import sample_seeded, settings_for
from twinflow.models.text_encoder import TextEncoder
from twinflow.serve.png import encode_pngs

EDIT_TASK = "edit"


# ----------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One request as the batch sees it (already validated by the API routes)."""

    model_id: str
    prompt: str
    nfe: int
    seed: int
    num_images: int = 1
    guidance: float | None = None  # None: the CFG the export recommends (0 for TwinFlow)
    image: np.ndarray | None = None  # edit: (H, W, C) uint8 at the model's pixel size
    weight: int = 1  # images it adds to a compute turn (twinflow.serve.batcher)
    queued_at: float = 0.0  # perf_counter when the route queued it (the replica's phase times)

    @property
    def task(self) -> str:
        return "edit" if self.image is not None else "generate"

    def group_key(self) -> tuple:
        return (self.model_id, self.nfe, float(self.guidance), self.task)


@dataclass
class Result:
    pngs: list[bytes]
    model_ms: float
    batch_requests: int = 1
    batch_images: int = 1
    group_requests: int = 1
    ready_at: float = 0.0  # perf_counter when its compute turn finished (the replica's phase times)


# ---------------------------------------------------------------------------------------- checkpoints
def tasks_of(meta: Mapping[str, Any]) -> list[str]:
    """What a checkpoint can do. Editing is declared by the exporter: `"tasks": ["generate", "edit"]`."""
    tasks = meta.get("tasks") or ["generate"]
    return [str(t) for t in tasks]


# ---------------------------------------------------------------------------------- row-stable calls
def _take(cond: Mapping[str, Any], idx) -> dict[str, Any]:
    return {k: v[idx] for k, v in cond.items()}


class RowStableModel:
    """Calls the generator in chunks of at most `max_rows` rows, each padded (with copies of its first
    row) up to a batch size in `sizes`, so a row's output never depends on how many rows came with it."""

    def __init__(self, generator, max_rows: int, sizes: Sequence[int] | None = None) -> None:
        self.generator = generator
        self.max_rows = int(max_rows)
        self.sizes = sorted(set(sizes)) if sizes else list(range(1, self.max_rows + 1))
        if self.sizes[-1] != self.max_rows:
            raise ValueError(f"sizes must include max_rows={self.max_rows}, got {self.sizes}")

    def padded_size(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.generator.sample_shape)

    def parameters(self):
        """The generator's (`sample_seeded` takes device and dtype from them)."""
        return self.generator.parameters()

    def __call__(self, x, t, r, cond):
        cond = dict(cond or {})
        outs = []
        for lo in range(0, x.shape[0], self.max_rows):
            hi = min(lo + self.max_rows, x.shape[0])
            n, size = hi - lo, self.padded_size(hi - lo)
            idx = torch.arange(lo, hi)
            if size > n:
                idx = torch.cat([idx, torch.full((size - n,), lo, dtype=torch.long)])
            out = self.generator(x[idx], t[idx], r[idx], _take(cond, idx))
            outs.append(out[:n])
        return torch.cat(outs)


def stable_sizes(
    generator, max_rows: int, *, text_len: int, with_ref: bool = False, seed: int = 0
) -> list[int]:
    """Batch sizes n <= max_rows whose rows are bit-identical to the same rows in a max_rows batch,
    wherever they sit in it. Kernel choice depends on shapes, not values, so one random input per
    shape tells. max_rows itself is always included."""
    g = torch.Generator().manual_seed(seed)
    C, H, W = generator.sample_shape
    B = max_rows
    x = torch.randn(B, C, H, W, generator=g)
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    r = t * torch.rand(B, generator=g)
    mask = torch.ones(B, text_len, dtype=torch.int64)
    mask[:, text_len // 2 :] = (torch.rand(B, text_len - text_len // 2, generator=g) < 0.5).long()
    cond = {
        "text_states": torch.randn(B, text_len, generator.text_dim, generator=g) * mask[..., None],
        "text_mask": mask,
    }
    if with_ref:
        cond["ref_image"] = torch.randn(B, C, H, W, generator=g)
    sizes = []
    with torch.no_grad():
        full = generator(x, t, r, cond)
        for n in range(1, B):
            ok = True
            for off in sorted({0, B - n, (B - n) // 2}):
                idx = torch.arange(off, off + n)
                if not torch.equal(generator(x[idx], t[idx], r[idx], _take(cond, idx)), full[idx]):
                    ok = False
                    break
            if ok:
                sizes.append(n)
    return sizes + [B]


# ------------------------------------------------------------------------------------ images (edits)
# (decoding and bounds of uploaded images: twinflow.serve.images)
def image_to_model(img, channels: int, size: int) -> np.ndarray:
    """PIL image -> (size, size, channels) uint8, the model's pixel geometry."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------------------------- served model
@dataclass
class ServedModel:
    id: str
    generator: Any
    export: Export
    codec: Any = None
    stable: dict[bool, RowStableModel] = field(default_factory=dict)
    max_rows: int = 16
    row_stable: bool | int = True

    @property
    def meta(self) -> dict[str, Any]:
        return self.export.meta

    @property
    def text_max_length(self) -> int:
        return self.export.text_max_length

    def guidance(self, requested: float | None) -> float:
        """The CFG a request samples with: its own, else the export's recommended one."""
        return self.export.sample_guidance if requested is None else float(requested)

    def model_fn(self, with_ref: bool):
        """The generator behind a RowStableModel (sizes checked on first use per call kind)."""
        if with_ref not in self.stable:
            if self.row_stable is False:
                sizes = None
            elif isinstance(self.row_stable, int) and not isinstance(self.row_stable, bool):
                lo = min(max(1, self.row_stable), self.max_rows)
                sizes = list(range(lo, self.max_rows + 1))
            else:
                sizes = stable_sizes(
                    self.generator, self.max_rows, text_len=self.text_max_length, with_ref=with_ref
                )
            self.stable[with_ref] = RowStableModel(self.generator, self.max_rows, sizes)
        return self.stable[with_ref]


def load_served_model(
    model_id: str,
    source: str,
    *,
    cache_dir: str | None = None,
    max_rows: int = 16,
    row_stable: bool | int = True,
) -> ServedModel:
    export = open_export(source, cache_dir=cache_dir)
    generator = export.generator()
    m = ServedModel(
        model_id, generator, export, export.codec(), max_rows=max(1, max_rows), row_stable=row_stable
    )
    m.model_fn(False)  # find the stable batch sizes now, not inside the first request
    return m


class TextEncoders:
    """The replica's caption encoders (`shared_text_encoder`, one per caption length), each with its
    LRU cache of per-prompt states."""

    def __init__(self, cache_size: int = 4096) -> None:
        self.cache_size = cache_size
        self._enc: dict[tuple, TextEncoder] = {}
        self._lock = threading.Lock()

    def get(self, max_length: int, spec: dict[str, Any] | None = None) -> TextEncoder:
        """`spec` (an export's `text_encoder_spec`) picks its encoder; None is MiniLM."""
        key = (
            max_length,
            None if spec is None else (spec.get("kind"), spec.get("path"), spec.get("null_prompt", "")),
        )
        with self._lock:
            if key not in self._enc:
                self._enc[key] = shared_text_encoder(max_length, cache_size=self.cache_size, spec=spec)
            return self._enc[key]

    def encode(
        self, prompts: Sequence[str], max_length: int, spec: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One caption per encoder call (so its states never depend on batch mates), cached."""
        enc = self.get(max_length, spec)
        rows = [enc.encode([p]) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in ("text_states", "text_mask")}

    def cache_info(self) -> dict[str, Any]:
        with self._lock:
            encs = dict(self._enc)
        info = {"size": 0, "capacity": self.cache_size, "hits": 0, "misses": 0}
        for enc in encs.values():
            for k, v in enc.cache_info().items():
                if k != "capacity":
                    info[k] += v
        return info


def run_group(
    model: ServedModel,
    encoders: TextEncoders,
    items: Sequence[Item],
    phases: dict[str, float] | None = None,
) -> list[list[bytes]]:
    """Sample every item of one group (same model, NFE, guidance, task) in one batch; PNGs per item.
    `phases` gains the ms spent assembling the batch (noise, text states), in the model, and encoding."""
    t0 = time.perf_counter()
    nfe, task = items[0].nfe, items[0].task
    settings = settings_for(model.export.method, nfe, guidance=model.guidance(items[0].guidance))
    dtype = next(model.generator.parameters()).dtype
    counts = [it.num_images for it in items]
    text = encoders.encode([it.prompt for it in items], model.text_max_length, model.export.text_encoder_spec)
    rep = torch.tensor(counts)
    cond = {k: v.repeat_interleave(rep, dim=0) for k, v in text.items()}
    null = None
    if settings.guidance > 0:
        n = encoders.get(model.text_max_length, model.export.text_encoder_spec).null_condition()
        null = {k: v.expand(sum(counts), *v.shape[1:]).contiguous() for k, v in n.items()}
    if task == EDIT_TASK:
        ref = torch.cat([_ref_tensor(model, it.image).expand(it.num_images, -1, -1, -1) for it in items])
        cond["ref_image"] = ref.to(dtype)
        if null is not None:
            null["ref_image"] = cond["ref_image"]
    t1 = time.perf_counter()
    with torch.no_grad():
        x = sample_seeded(
            model.model_fn(task == EDIT_TASK),
            cond,
            settings,
            [(it.num_images, it.seed) for it in items],  # each request its own seed, whatever its batch
            null_cond=null,
        )
        if model.codec is not None:
            x = model.codec.decode(x)
    t2 = time.perf_counter()
    pngs = encode_pngs(to_uint8(x))  # the bytes Pillow writes, for the whole batch in one pass
    out, start = [], 0
    for c in counts:
        out.append(pngs[start : start + c])
        start += c
    if phases is not None:
        for name, ms in (("assembly", t1 - t0), ("model", t2 - t1), ("encoding", time.perf_counter() - t2)):
            phases[name] = phases.get(name, 0.0) + ms * 1e3
    return out


def _ref_tensor(model: ServedModel, image: np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if model.codec is not None:
        with torch.no_grad():
            return model.codec.encode(t)
    return t


def run_items(
    models: Mapping[str, ServedModel],
    encoders: TextEncoders,
    items: Sequence[Item],
    phases: dict[str, float] | None = None,
) -> list[Result]:
    """Group a batch by (model, NFE, guidance, task) and sample each group in one go (in-process,
    what one compute turn of the deployment's batch does; also the benchmark's in-process baseline).
    `phases` (optional) sums run_group's assembly/model/encoding ms over the groups."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        it.guidance = models[it.model_id].guidance(it.guidance)  # None -> the export's own, before grouping
        groups.setdefault(it.group_key(), []).append(i)
    results: list[Result | None] = [None] * len(items)
    total_images = sum(it.num_images for it in items)
    for key, idxs in groups.items():
        t0 = time.perf_counter()
        pngs = run_group(models[key[0]], encoders, [items[i] for i in idxs], phases)
        ms = (time.perf_counter() - t0) * 1e3
        for i, p in zip(idxs, pngs):
            results[i] = Result(p, ms, len(items), total_images, len(idxs))
    return results  # type: ignore[return-value]
