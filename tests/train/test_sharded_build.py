"""Start-up without the whole generator on one device: at ZeRO-3 on 2 CPU ranks (real DeepSpeed,
gloo) the generator is built partitioned and `train.init_from` streamed in, in bf16, and each rank's
peak live parameter bytes (whole tensors plus ZeRO-3 partitions) stay near half the model plus one
module; without ZeRO-3 the streamed load never makes an fp32 copy of a bf16 job's weights."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "fashion_base"
SCRIPT = Path(__file__).with_name("sharded_build_ranks.py")


def test_init_from_streams_into_a_bf16_model_without_an_fp32_copy():
    from torch.nn.modules.module import register_module_parameter_registration_hook

    from twinflow.models.export import load_generator
    from twinflow.train import modelling
    from twinflow.train.config import load_job

    job = load_job(
        REPO / "jobs" / "fashion_twinflow.yaml",
        [f"train.init_from={FIXTURE}", "deepspeed.precision=bf16"],
    )
    dtypes = set()
    handle = register_module_parameter_registration_hook(
        lambda m, n, p: dtypes.add(p.dtype) if p is not None else None
    )
    try:
        model = modelling.build_model(job)
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}  # nothing was ever made in fp32 on the way
    want, _ = load_generator(FIXTURE)
    got = model.state_dict()
    for k, v in want.state_dict().items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_init_from_that_does_not_fit_names_the_field(tmp_path):
    import shutil

    from twinflow.train import modelling
    from twinflow.train.config import load_job

    broken = tmp_path / "export"
    shutil.copytree(FIXTURE, broken)
    (broken / "twinflow_extra.safetensors").unlink()  # the text projection is gone
    job = load_job(REPO / "jobs" / "fashion_twinflow.yaml", [f"train.init_from={broken}"])
    with pytest.raises(ValueError, match=r"train.init_from .*missing.*text_proj"):
        modelling.build_model(job)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_zero3_startup_peak_is_half_the_model_plus_one_module(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(r), "2", port, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=540)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["mismatch"] == [] and res["dtypes"] == ["torch.bfloat16"], res
    half = res["total_bytes"] / 2
    for peak in res["peak_bytes_per_rank"]:
        # each rank holds its half; on top of it one module at a time (being built, or gathered to load)
        assert half <= peak <= half + res["largest_block_bytes"], res
        assert peak < 0.75 * res["total_bytes"], res  # far from the whole model on one rank
