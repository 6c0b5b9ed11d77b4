"""A real ZeRO-3 job keeping an EMA teacher and a sampling EMA on the training module (2 Ray Train
workers, DeepSpeed over gloo): rank 1 dies at step 3, the group resumes from step 2 with each
rank's averages restored from its own checkpoint file, and the export is the sampling EMA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from twinflow.models.export_loader import load_generator
from twinflow.train.averages import FILE_PATTERN
from twinflow.train.launcher import run_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reliability's job helpers
from reliability.helpers import WORLD, checkpoint_dirs, make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_zero3_ema_teacher_and_sampling_ema_survive_a_lost_worker(ray_cluster, fashion_small, tmp_path, lora):
    name = f"z3_ema_{'lora' if lora else 'full'}"
    result = run_job(
        make_job(
            fashion_small,
            tmp_path,
            name,
            "train.init_from=null",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=bf16",
            "method.teacher=ema",
            "method.ema_decay=0.9",
            "train.sample_ema=0.8",
            "train.max_failures=1",
            *(["model.lora.rank=4"] if lora else []),
            base="fashion_twinflow.yaml",
        ),
        fault_at_step=3,
    )
    assert result.ok, result.error
    assert result.steps == 4
    run = Path(result.run_dir)
    assert (run / ".injected_failure_step3").exists()  # resumed from the step-2 checkpoint
    ckpts = checkpoint_dirs(run)
    assert ckpts
    for c in ckpts:  # one averages file per rank, each with its own part
        assert sorted(p.name for p in c.glob(FILE_PATTERN.format(rank="*"))) == [
            FILE_PATTERN.format(rank=r) for r in range(WORLD)
        ]
    restored = (run / "logs" / "checkpoints.log").read_text()
    assert "restored checkpoint" in restored
    gen, meta = load_generator(run / "export")
    assert meta["lora"] is not None if lora else meta["lora"] is None
    assert all(torch.isfinite(p).all() for p in gen.parameters())
