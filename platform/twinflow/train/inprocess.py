"""Train a job in this process, without Ray or DeepSpeed: recipe search, image-scale regression tests,
quick looks at a method change.

Data in memory, then the same loop as a Ray Train worker (`train.loop`) on the plain torch engine
(`engines.TorchEngine`: AdamW with the job's lr, betas, weight decay, clipping and accumulation). The
data is decoded once and each distinct caption is encoded once (captions repeat per class), so a step
costs the model's compute and nothing else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from torch import Tensor

from twinflow.data.config import DataConfig
from twinflow.data.local import iter_local_batches
from twinflow.train import loop, modelling
from twinflow.train.averages import Averages
from twinflow.train.checkpointing import TrainState
from twinflow.train.config import JobConfig
from twinflow.train.engines import TorchEngine


@dataclass
class MemoryData:
    """A split held as tensors: images in [-1, 1], class labels, and per-row caption ids into the
    encoded distinct captions."""

    images: Tensor
    labels: Tensor
    caption_ids: Tensor
    captions: list[str]
    states: Tensor
    masks: Tensor
    refs: Tensor | None = None  # edit jobs: the source images, given to the model as `ref_image`

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def rows(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.caption_ids[idx]
        cond = {"text_states": self.states[c], "text_mask": self.masks[c]}
        if self.refs is not None:
            cond["ref_image"] = self.refs[idx]
        return self.images[idx], cond


def load_memory_data(data: DataConfig, encoder: Any, limit: int | None = None) -> MemoryData:
    """Decode a split (local or s3://) with the pipeline's own rules and encode its distinct captions
    (instructions for an edit job, which also keeps the source images)."""
    images, labels, captions, refs = [], [], [], []
    edits = data.is_edit
    for b in iter_local_batches(data, limit=limit):
        images.append(torch.as_tensor(b["image"]))
        if edits:
            refs.append(torch.as_tensor(b["source_image"]))
        labels.append(torch.as_tensor(b["label"]).long() if "label" in b else torch.full((len(b["id"]),), -1))
        texts = b["instruction"] if edits else b["caption"]
        captions.extend(str(t) for t in texts)
    if not images:
        raise ValueError(f"{data.path} ({data.split}): no usable records")
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    enc = encoder.encode(distinct)
    return MemoryData(
        torch.cat(images).float(),
        torch.cat(labels),
        torch.tensor([index[c] for c in captions]),
        distinct,
        enc["text_states"].float(),
        enc["text_mask"],
        torch.cat(refs).float() if edits else None,
    )


@dataclass
class InProcessRun:
    """What a run leaves: the online model, its teacher and sampling EMA (`train.averages.Averages`), and one
    metrics dict per logged step (means over the steps since the last log)."""

    model: torch.nn.Module
    averages: Averages
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def teacher(self) -> Any:
        return self.averages.teacher

    @property
    def sample_ema(self) -> Any:
        return self.averages.sample_ema

    @property
    def sampling_model(self) -> torch.nn.Module:
        """The weights a user samples from: a copy holding the sampling EMA when the job keeps one."""
        if self.averages.sample_ema is None:
            return self.model
        with self.averages.sampling() as module:
            return copy.deepcopy(module)


def memory_batches(
    data: MemoryData, micro_batch: int, seed: int, order: Literal["shuffled", "stored"] = "shuffled"
) -> Iterator[loop.Batch]:
    """Micro-batches of `micro_batch` rows forever: a fresh permutation per pass (from `seed`), or the
    stored order ("stored": the order a one-worker Ray Data stream of unshuffled shards delivers)."""
    order_gen = torch.Generator().manual_seed(seed + 17)
    while True:
        idx = (
            torch.randperm(len(data), generator=order_gen) if order == "shuffled" else torch.arange(len(data))
        )
        for pos in range(0, len(idx) - micro_batch + 1, micro_batch):
            yield data.rows(idx[pos : pos + micro_batch])


def train_in_process(
    job: JobConfig,
    *,
    data: MemoryData | None = None,
    encoder: Any = None,
    model: torch.nn.Module | None = None,
    steps: int | None = None,
    log_every: int | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int, InProcessRun], None] | None = None,
    null_cond: Mapping[str, Tensor] | None = None,
    order: Literal["shuffled", "stored"] = "shuffled",
) -> InProcessRun:
    """Run `job`'s method for `steps` (default `job.train.steps`) optimizer steps of `train.micro_batch`
    rows x `deepspeed.gradient_accumulation_steps`. `model` defaults to `modelling.build_model(job)`
    (with `init_from` and LoRA). `on_log` gets each logged row; `on_step(step, run)` runs after every
    optimizer step (e.g. to evaluate)."""
    steps = int(steps if steps is not None else job.train.steps)
    job = job.model_copy(update={"train": job.train.model_copy(update={"steps": steps})})
    torch.manual_seed(job.train.seed)
    if encoder is None and (data is None or null_cond is None):
        # MiniLM (or the family's encoder) loads only when the caller brought neither data nor encoder
        from twinflow.models.text_encoder import open_text_encoder

        encoder = open_text_encoder(job.model.text_encoder_spec, job.data.text_max_length)
    if data is None:
        data = load_memory_data(job.data, encoder)
    if null_cond is None:
        null_cond = encoder.null_condition()
    model = model if model is not None else modelling.build_model(job)
    model.train()
    averages = modelling.build_averages(job, model)
    engine = TorchEngine(model, [p for p in model.parameters() if p.requires_grad], job.train, job.deepspeed)
    run = InProcessRun(model, averages)

    def keep(step: int, metrics: dict[str, float]) -> None:
        row = {"step": float(step), **metrics}
        run.history.append(row)
        if on_log is not None:
            on_log(row)

    components: list[loop.Scheduled] = [loop.LogMetrics(int(log_every or job.train.log_every), keep)]
    if on_step is not None:
        components.append(loop.Callback(lambda step, _: on_step(step, run)))
    loop.run(
        loop.Loop(job, engine, averages, TrainState()),
        modelling.build_objective(job),
        memory_batches(data, job.train.micro_batch, job.train.seed, order),
        null_cond=null_cond,
        generator=torch.Generator().manual_seed(job.train.seed * 100_003),
        components=components,
    )
    model.eval()
    return run
