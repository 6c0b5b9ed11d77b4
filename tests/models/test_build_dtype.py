"""Jobs build their generator directly in the training precision: a bf16 job never holds an fp32
copy of its weights on the way to the GPU (the 20B Qwen-Image would peak at 82 GB), and `twinflow
plan`'s startup peak is what the build really allocates."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

from twinflow.train import modelling


def _job(**changes):
    from twinflow.train.config import load_job

    base = {"train.init_from": "null", "method.teacher": "online", "train.sample_ema": "null"}
    return load_job(
        "jobs/mnist_twinflow.yaml", overrides=[f"{k}={v}" for k, v in {**base, **changes}.items()]
    )


@contextlib.contextmanager
def registered_bytes():
    """Bytes of every materialised parameter created inside the block, by dtype (meta ones are free)."""
    seen: dict[torch.dtype, int] = {}

    def hook(module, name, param):
        if param is not None and param.device.type != "meta":
            seen[param.dtype] = seen.get(param.dtype, 0) + param.numel() * param.element_size()

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_a_bf16_job_is_built_in_bf16_and_the_plan_counts_that_peak():
    from twinflow.plan.memory import Layout, estimate
    from twinflow.plan.planner import workload

    job = _job(**{"deepspeed.precision": "bf16"})
    with registered_bytes() as seen:
        model = modelling.build_model(job)
    n = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # no parameter ever existed in fp32 (E2, deep-copied from E1, is not registered, hence <=)
    assert set(seen) == {torch.bfloat16} and seen[torch.bfloat16] <= 2 * n
    plan = estimate(workload(job), Layout(gpus=1, zero_stage=2))
    assert plan.startup == 2 * n
    # fp32 jobs are unchanged: 4 bytes per parameter
    fp32 = _job()
    with registered_bytes() as seen:
        model = modelling.build_model(fp32)
    assert set(seen) == {torch.float32} and estimate(workload(fp32), Layout(1, 2)).startup == 4 * n


def test_a_pretrained_backbone_loads_in_the_training_dtype(qwen_pipeline_dir):
    from twinflow.models import build_generator
    from twinflow.models.config import ModelConfig

    cfg = ModelConfig(pretrained_path=str(qwen_pipeline_dir), vae_path=str(qwen_pipeline_dir), image_size=32)
    want = build_generator(cfg)
    with registered_bytes() as seen:
        got = build_generator(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
    assert torch.float32 not in seen
    loaded = got.backbone.state_dict()  # (text_proj is a fresh random init here: MiniLM captions)
    for k, a in want.backbone.state_dict().items():
        assert torch.equal(a.to(loaded[k].dtype), loaded[k]), k  # the same weights, loaded as bf16


def test_teacher_and_sampling_averages_are_fp32_and_leave_the_bf16_model_unchanged():
    """The averages are made on the built model (after DeepSpeed, in the worker) in fp32, without
    casting the model: its weights and dtype are exactly as built."""
    job = _job(**{"deepspeed.precision": "bf16", "method.teacher": "ema", "train.sample_ema": 0.99})
    model = modelling.build_model(job)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with registered_bytes() as seen:
        averages = modelling.build_averages(job, model)
    assert seen == {}  # no parameter made: the averages are fp32 shards, not module copies
    for kept in (averages.teacher.average, averages.sample_ema):
        assert {s.dtype for s in kept.shards} == {torch.float32}
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sum(s.numel() for s in kept.shards) == n  # one rank: its share is all of it
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert modelling.copies_made(job) == 2
