"""Per-GPU memory of one training layout: model states, averages, activations and TwinFlow's passes.

Model states use DeepSpeed's own accounting (its `estimate_zero2/3_model_states_mem_needs`, which the
tests compare against): with bf16 each trainable parameter costs 16 optimizer bytes (fp32 master,
Adam m and v, fp32 gradient) sharded over the GPUs from ZeRO-1 on; the bf16 gradients are whole
under ZeRO-0/1 and sharded from ZeRO-2 on; ZeRO-3 shards the weights too and adds one gathered block
(its bf16 weights and gradients). Frozen (LoRA base) weights cost only their weights.

Beyond its estimators, DeepSpeed allocates a contiguous-gradient bucket of `reduce_bucket_size`
elements (5e8 by default: ~1 GB in bf16, whatever the model's size) on the device under ZeRO-1/2/3
(**buffers**; ZeRO-3 at engine start, ZeRO-1/2 at each step's first backward).

Beyond DeepSpeed (what the worker loop does, train/modelling.py, train/averages.py):
- the generator is built in the training precision (`modelling.build_model`). Under ZeRO-3 it is
  built partitioned (`train/sharded_build.py`: each module's weights are partitioned as the module
  is made, a pretrained base or `train.init_from` streamed in one module at a time,
  `models/streamed.py`), so the **startup** peak is the rank's partition (on the host with parameter
  offload) plus the largest module gathered and the tensor read into it; at ZeRO-0/1/2 it is the
  whole model, 2 (bf16) or 4 (fp32) bytes per parameter. The averages are made after DeepSpeed
  wrapped the model: their bytes come on top;
- the averages (the EMA teacher, a frozen teacher without LoRA, `train.sample_ema`) are fp32 and
  sized by what they average (**ema**): a LoRA job holds each as a second adapter on the same frozen
  base (4 bytes per LoRA parameter, whole on every rank) plus each rank's 1/world slice of the other
  trainable weights (E2, the text projection); a full fine-tune holds each rank's 1/world slice of
  every trainable weight at any stage. With offload they live on the host. A frozen teacher with
  LoRA is the model with its adapters off (free);
- TwinFlow's no-grad forwards (fake samples, CFG pair, rollout) run before the one forward with
  gradient; their activations are freed block by block, so only the largest call's working set
  counts (**no-grad peak**), not their sum. One no-grad call (the rectify pair with the last rollout
  sub-step, method/twinflow.py) runs after the grad forward, while its saved activations are held:
  its working set counts on top of them (**overlap rows**), or the backward's, whichever is larger.
  Activation bytes come from fits measured at the job's precision (`activations.py`), the no-grad
  peak including the text path (the caption states' own width, `activations.TEXT_PATH_CONFIGS`);
- the inputs of the model calls are counted apart from the activations (**input_row** bytes per
  row: the state in fp32, the caption states in the training precision, the int64 mask): the
  micro-batch, plus the rows the objective gathers for the call under way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinflow.plan.activations import ActivationModel
from twinflow.plan.counts import ModelCounts

AVERAGE_BYTES = 4  # the averages are fp32 whatever the training precision
REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)


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
    tokens: int  # tokens per row through every block (image + reference + text)
    activations: ActivationModel
    overlap_rows: int = (
        0  # rows of the largest no-grad forward run while the grad forward's activations are held
    )
    emas: int = 0  # fp32 averages of the trained weights (EMA teacher, frozen teacher, sampling EMA)
    lora: bool = False  # the averages' LoRA part is a second adapter, whole on every rank
    input_row: int = 0  # bytes of one row of a model call's inputs (state, caption states, mask)


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
    startup: int
    cpu: int
    ema: int = 0
    buffers: int = 0  # DeepSpeed's contiguous-gradient reduce bucket

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def training(self) -> int:
        """Steady state: states + averages + DeepSpeed's bucket + the larger of the grad pass and the
        biggest no-grad pass."""
        return self.model_states + self.ema + self.buffers + max(self.activations, self.nograd_peak)

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


def ema_states(trainable: int, adapter: int, emas: int, layout: Layout) -> tuple[int, int]:
    """(GPU bytes, host bytes) of `emas` fp32 averages of `trainable` parameters per GPU process, of
    which `adapter` are LoRA parameters (averaged whole as a second adapter), the rest sliced 1/world."""
    total = emas * AVERAGE_BYTES * (adapter + (trainable - adapter) // layout.gpus)
    host = layout.offload_optimizer or layout.offload_params  # `averages.build(host=...)`
    return (0, total) if host else (total, 0)


def reduce_bucket_bytes(layout: Layout, precision: str) -> int:
    """DeepSpeed's contiguous-gradient bucket (ZeRO-1/2/3, `contiguous_gradients` on by default):
    `reduce_bucket_size` gradient elements on the device, allocated whole."""
    if layout.zero_stage == 0:
        return 0
    return REDUCE_BUCKET_SIZE * (2 if precision == "bf16" else 4)


def startup_bytes(counts: ModelCounts, layout: Layout, precision: str) -> int:
    """GPU bytes of the build: the whole model, or under ZeRO-3 the rank's partition (on the host
    with parameter offload) plus the largest module gathered and the tensor read into it."""
    w = 2 if precision == "bf16" else 4
    if layout.zero_stage != 3:
        return w * counts.total
    module = 2 * w * counts.largest_module
    return module if layout.offload_params else w * counts.total // layout.gpus + module


def estimate(work: Workload, layout: Layout) -> Estimate:
    c = work.counts
    weights, gradients, optimizer, gathered, host = model_states(
        c.total, c.trainable, c.largest_layer, layout, work.precision
    )
    text = (c.text_tokens, c.text_width, work.tokens - c.text_tokens)
    row = work.activations.per_row(
        c.layers, work.tokens, c.width, c.heads, layout.checkpointing, work.precision, text
    )
    # what the forward with gradient saved stays until its backward; on top of it comes either the
    # no-grad call made between that forward and the backward, or the backward's own working set
    # (with checkpointing: the recomputed block and its gradients), whichever is larger
    # the inputs: the micro-batch itself, and the rows the objective gathers for a batched call
    # (caption states dominate: 256 x 3584 per row from Qwen2.5-VL)
    activations = (
        work.grad_rows * row.saved
        + max(work.grad_rows * row.backward, work.overlap_rows * row.transient)
        + work.input_row * (work.grad_rows + work.overlap_rows)
    )
    nograd = work.nograd_rows * row.transient + work.input_row * (work.grad_rows + work.nograd_rows)
    ema, ema_host = ema_states(c.trainable, c.lora_trainable if work.lora else 0, work.emas, layout)
    startup = startup_bytes(c, layout, work.precision) + ema
    buffers = reduce_bucket_bytes(layout, work.precision)
    return Estimate(
        layout=layout,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        gathered=gathered,
        activations=activations,
        nograd_peak=nograd,
        startup=startup,
        cpu=host + ema_host,
        ema=ema,
        buffers=buffers,
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
    # the objective's module imports the model stack; only the no-grad probe needs it
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
