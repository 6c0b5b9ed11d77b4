"""The two-time embedder under a real DeepSpeed ZeRO-3 engine (one gloo rank, in a subprocess so the
process group never leaks into the test session)."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import copy, os, socket, sys
    import torch
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed, deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no shm JIT on CPU
    from twinflow.models.config import ModelConfig
    from twinflow.models.generator import build_generator
    from twinflow.models.time_embed import e2_parameters
    torch.manual_seed(0)
    family = sys.argv[1]
    g = build_generator(ModelConfig(family=family, preset="tiny-28g", e2_init="random"))
    ref = copy.deepcopy(g)
    cfg = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=g, model_parameters=list(g.parameters()), config=cfg)
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1.0, 0.7, 0.3, -0.5])
    r = torch.tensor([0.0, 0.5, 0.3, -0.5])
    cond = {"text_states": torch.randn(4, 8, 384)}
    out = engine(x, t, r, cond)
    assert torch.equal(out, ref(x, t, r, cond)), "ZeRO-3 forward differs"
    with torch.no_grad():
        assert torch.equal(engine(x, t, t, cond), ref(x, t, t, cond)), "ZeRO-3 r=t differs"
    before = {n: p.detach().clone() for n, p in e2_parameters(ref)}
    engine.backward(out.square().mean())
    engine.step()
    with deepspeed.zero.GatheredParameters(list(g.parameters())):
        moved = [n for n, p in e2_parameters(g) if not torch.equal(p.detach(), before[n])]
    assert moved, "E2 was not updated by the ZeRO-3 step"
    dist.barrier()
    dist.destroy_process_group()
    print("OK", len(moved))
""")


@pytest.mark.integration
@pytest.mark.parametrize("family", ["qwen_image", "sana"])
def test_two_time_generator_under_zero3(family):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, family], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 4" in proc.stdout
