"""The DeepSpeed config the worker builds (ZeRO-1/2 with a single rank runs as stage 0), and a TwinFlow\nstep through a real ZeRO-3 engine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from twinflow.train.engine import deepspeed_config
from twinflow.train.sections import DeepSpeedConfig, TrainConfig


@pytest.mark.parametrize(
    "zero, offload, world, stage",
    [
        (2, False, 1, 0),  # nothing to partition with one rank: skip ZeRO-2's bucketing and copies
        (1, False, 1, 0),
        (2, False, 2, 2),
        (2, True, 1, 2),  # optimizer offload needs the ZeRO optimizer
        (3, False, 1, 3),  # ZeRO-3 shards parameters: kept
        (0, False, 4, 0),
    ],
)
def test_zero_stage_for_the_world_size(zero, offload, world, stage):
    ds = DeepSpeedConfig(zero_stage=zero, offload_optimizer=offload)
    cfg = deepspeed_config(ds, TrainConfig(steps=1, micro_batch=4), world)
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in cfg["zero_optimization"]) == offload


ZERO3_TWINFLOW = textwrap.dedent("""
    import copy, os, socket
    import torch
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    from twinflow.method import TwinFlowConfig, TwinFlowObjective
    from twinflow.models.config import ModelConfig
    from twinflow.models.generator import build_generator
    from twinflow.train.engine import deepspeed_config, full_parameters, init_engine
    from twinflow.train.sections import DeepSpeedConfig, TrainConfig
    torch.manual_seed(0)
    g = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", e2_init="random"))
    ref = copy.deepcopy(g)
    train = TrainConfig(steps=1, micro_batch=8, lr=1e-3)
    ds = DeepSpeedConfig(zero_stage=3)
    engine = init_engine(g, g.parameters(), deepspeed_config(ds, train, 1))
    x = torch.randn(8, 1, 28, 28).clamp(-1, 1)
    cond = {"text_states": torch.randn(8, 8, 384), "text_mask": torch.ones(8, 8, dtype=torch.long)}
    null = {"text_states": torch.zeros(1, 8, 384), "text_mask": torch.ones(1, 8, dtype=torch.long)}
    objective = TwinFlowObjective(TwinFlowConfig(teacher="online"))
    def step(model):
        return objective(model, x, cond, teacher=None, null_cond=null, generator=torch.Generator().manual_seed(1))
    out = step(engine)  # its last no-grad call runs between the grad forward and the backward
    engine.backward(out.loss)
    engine.step()
    opt = torch.optim.AdamW(ref.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    ref_out = step(ref)
    ref_out.loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), ds.gradient_clipping)
    opt.step()
    assert out.model_calls == 4 and abs(out.loss.item() - ref_out.loss.item()) < 1e-5 * abs(ref_out.loss.item())
    with full_parameters(g, 3):
        worst = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(g.parameters(), ref.parameters()))
    assert worst < 1e-5, worst
    dist.barrier()
    dist.destroy_process_group()
    print("OK", worst)
""")


@pytest.mark.integration
def test_twinflow_step_under_zero3_matches_a_plain_torch_step():
    """TwinFlow's plan runs one no-grad call between the grad forward and the backward; under a real
    ZeRO-3 engine (one gloo rank, in a subprocess) one step must move the weights as plain torch does."""
    proc = subprocess.run([sys.executable, "-c", ZERO3_TWINFLOW], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
