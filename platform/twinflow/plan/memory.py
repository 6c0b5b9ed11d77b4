"""Per-GPU memory of one training layout: model states, activations, TwinFlow's passes and copies.

Model states use DeepSpeed's own accounting (its `estimate_zero2/3_model_states_mem_needs`, which the
tests compare against): with bf16 each trainable parameter costs 16 optimizer bytes (fp32 master,
Adam m and v, fp32 gradient) sharded over the GPUs from ZeRO-1 on; the bf16 gradients are whole
under ZeRO-0/1 and sharded from ZeRO-2 on; ZeRO-3 shards the weights too and adds one gathered block
(its bf16 weights and gradients). Frozen (LoRA base) weights cost only their weights.

Beyond DeepSpeed (what the worker loop does, train/worker.py and train/modelling.py):
- the generator is built directly in the training precision (`modelling.build_model`) and moved
  to the GPU whole before DeepSpeed shards it: the **startup** peak is 2 (bf16) or 4 (fp32) bytes
  per parameter; while whole-model copies are made (a frozen teacher, and today the full-model
  EMAs before DeepSpeed shards them), a bf16 model is cast to fp32 (exact round trip), so the
  startup peak is then 4 bytes per parameter plus the copies; a LoRA job's adapter EMA is made on
  the model as built (its bytes on top of the build);
- an EMA (the EMA teacher, `train.sample_ema`) is fp32 and sized by what it averages (**ema**): a LoRA
  job holds it as a second adapter on the same frozen base (4 bytes per trainable parameter, LoRA
  plus E2 and the text projection); a full fine-tune under ZeRO holds it sharded with the optimizer
  partition (4 bytes per parameter / GPUs, on the host when the optimizer is offloaded); only
  ZeRO-0 keeps a whole fp32 copy per GPU;
- a frozen teacher without LoRA is an fp32 deep copy of the whole generator on every GPU (**copies**);
  with LoRA it is the model with its adapters off (free);
- TwinFlow's no-grad forwards (fake samples, CFG pair, rollout) run before the one forward with
  gradient; their activations are freed block by block, so only the largest call's working set
  counts (**no-grad peak**), not their sum. One no-grad call (the rectify pair with the last rollout
  sub-step, method/twinflow.py) runs after the grad forward, while its saved activations are held:
  its working set counts on top of them (**overlap rows**), or the backward's, whichever is larger.
  Activation bytes come from fits measured at the job's precision (`activations.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinflow.plan.activations import ActivationModel
from twinflow.plan.counts import ModelCounts

COPY_BYTES = 4  # the teacher / EMA copies are fp32 whatever the training precision


@dataclass(frozen=True)
class Layout:
    gpus: int
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")

    @property
    def offload_level(self) -> int:
        return int(self.offload_optimizer) + int(self.offload_params)

    def label(self) -> str:
        off = {0: "-", 1: "opt", 2: "opt+params"}[self.offload_level]
        return f"{self.gpus} GPU  ZeRO-{self.zero_stage}  offload {off}  ckpt {'on' if self.checkpointing else 'off'}"


@dataclass(frozen=True)
class Workload:
    """Everything about the job the memory depends on, besides the layout."""

    counts: ModelCounts
    precision: str  # "bf16" or "fp32"
    micro_batch: int
    grad_rows: int  # rows of the forward with gradient (the micro-batch)
    nograd_rows: int  # rows of the largest no-grad forward before the grad forward
    copies: int  # fp32 deep copies of the whole generator (a frozen teacher without LoRA)
    tokens: int  # tokens per row through every block (image + reference + text)
    activations: ActivationModel
    overlap_rows: int = (
        0  # rows of the largest no-grad forward run while the grad forward's activations are held
    )
    emas: int = 0  # fp32 EMAs of the trained weights (EMA teacher, sampling EMA)
    lora: bool = False  # EMAs are a second adapter, not copies of the model


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (cpu: bytes of host memory per GPU process for offloaded states)."""

    layout: Layout
    weights: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    nograd_peak: int
    copies: int
    startup: int
    cpu: int
    ema: int = 0

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def training(self) -> int:
        """Steady state: states + EMAs + copies + the larger of the grad pass and the biggest no-grad pass."""
        return self.model_states + self.ema + self.copies + max(self.activations, self.nograd_peak)

    @property
    def peak(self) -> int:
        return max(self.training, self.startup)


def model_states(
    total: int, trainable: int, largest_layer: int, layout: Layout, precision: str
) -> tuple[int, int, int, int, int]:
    """(weights, gradients, optimizer, gathered block, host bytes) per GPU, DeepSpeed's accounting."""
    w = 2 if precision == "bf16" else 4
    opt = 16 if precision == "bf16" else (8 if layout.zero_stage == 0 else 12)
    n, stage = layout.gpus, layout.zero_stage
    shard = 1 if stage == 0 else n
    weights = w * total
    gradients = w * trainable // (n if stage >= 2 else 1)
    optimizer = opt * trainable // shard
    gathered = 0
    host = 0
    if layout.offload_optimizer:
        host += optimizer + w * trainable // n
        optimizer = gradients = 0
    if stage == 3:
        weights = 0 if layout.offload_params else w * total // n
        host += w * total // n if layout.offload_params else 0
        gradients = 0  # reduce-scattered block by block: inside the gathered block
        gathered = 2 * w * largest_layer
    return weights, gradients, optimizer, gathered, host


def ema_states(trainable: int, emas: int, lora: bool, layout: Layout) -> tuple[int, int]:
    """(GPU bytes, host bytes) of `emas` fp32 EMAs of `trainable` parameters per GPU process."""
    whole = emas * COPY_BYTES * trainable
    if lora or layout.zero_stage == 0:  # the adapter EMA sits beside the adapter; ZeRO-0 shards nothing
        return whole, 0
    shard = whole // layout.gpus  # with the optimizer partition: same shard, same place
    return (0, shard) if layout.offload_optimizer else (shard, 0)


def estimate(work: Workload, layout: Layout) -> Estimate:
    c = work.counts
    weights, gradients, optimizer, gathered, host = model_states(
        c.total, c.trainable, c.largest_layer, layout, work.precision
    )
    row = work.activations.per_row(
        c.layers, work.tokens, c.width, c.heads, layout.checkpointing, work.precision
    )
    # what the forward with gradient saved stays until its backward; on top of it comes either the
    # no-grad call made between that forward and the backward, or the backward's own working set
    # (with checkpointing: the recomputed block and its gradients), whichever is larger
    activations = work.grad_rows * row.saved + max(
        work.grad_rows * row.backward, work.overlap_rows * row.transient
    )
    nograd = work.nograd_rows * row.transient
    copies = work.copies * COPY_BYTES * c.total
    ema, ema_host = ema_states(c.trainable, work.emas, work.lora, layout)
    build = (2 if work.precision == "bf16" else 4) * c.total
    if work.lora:  # an adapter EMA is made beside the adapter, on the model as built
        startup = build + ema
    elif copies or work.emas:  # whole-model copies are made in fp32 with the model cast to fp32 meanwhile
        startup = COPY_BYTES * c.total + copies + work.emas * COPY_BYTES * c.total
    else:
        startup = build
    return Estimate(
        layout=layout,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        gathered=gathered,
        activations=activations,
        nograd_peak=nograd,
        copies=copies,
        startup=startup,
        cpu=host + ema_host,
        ema=ema,
    )


PROBE_SEEDS = 16  # the rows of some calls depend on the step's random times: the plan takes the largest seen


def forward_rows(method, batch: int, conditional: bool = True, layout=None) -> tuple[int, int, int]:
    """(rows of the forward with gradient, of the largest no-grad forward before it, of the largest
    one after it) of one training step, found by running the job's real objective on a one-parameter
    stand-in model. The rollout's rows depend on the drawn times (only rows with t - r >= delta are
    rolled out), so the probe runs a fixed set of seeds and keeps the largest of each: the same
    job always gets the same plan. With the job's `layout` (`method.groups.BatchLayout`), every
    micro-batch of a step holds its own part of the global group split (and ranks make the same calls,
    `lockstep`): the probe runs each of them and keeps the largest."""
    from twinflow.method import build_objective

    calls: list[tuple[int, bool]] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, r, cond):
            calls.append((int(x.shape[0]), torch.is_grad_enabled()))
            return x * self.w

    objective = build_objective(method)
    slot_split = getattr(objective, "slot_split", None) if layout is not None else None
    slots = (
        [
            {"split": slot_split(layout, 0, rank, micro), "lockstep": layout.ranks > 1}
            for rank in range(layout.ranks)
            for micro in range(layout.accumulation)
        ]
        if slot_split is not None
        else [{}]
    )
    grad = before = after = 0
    for seed, rows in ((s, r) for s in range(PROBE_SEEDS) for r in slots):
        calls.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Probe()
            make_teacher = getattr(objective, "make_teacher", None)
            teacher = make_teacher(model) if make_teacher is not None else None
            x = torch.randn(batch, 1, 2, 2)
            cond = {
                "text_states": torch.randn(batch, 2, 4),
                "text_mask": torch.ones(batch, 2, dtype=torch.int64),
            }
            null = {"text_states": torch.zeros(1, 2, 4), "text_mask": torch.ones(1, 2, dtype=torch.int64)}
            objective(model, x, cond if conditional else None, teacher=teacher, null_cond=null, **rows)
        first_grad = next((i for i, (_, g) in enumerate(calls) if g), len(calls))
        grad = max(grad, *(n for n, g in calls if g), 0)
        before = max(before, *(n for n, g in calls[:first_grad] if not g), 0)
        after = max(after, *(n for n, g in calls[first_grad:] if not g), 0)
    return grad, before, after
