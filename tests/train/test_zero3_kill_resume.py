"""A real ZeRO-3 TwinFlow job (2 Ray Train workers, DeepSpeed over gloo, bf16) keeping an EMA teacher
and a sampling EMA loses rank 1 for real at step 3; Ray Train restarts the group from the step-2
checkpoint. One killed run per adapter kind serves every assertion of this module (module-scoped
fixtures): the restored step, the logs and export against the same job run uninterrupted, each
rank's averages file in every checkpoint, and the averages the restore left equal to the ones the
step-2 checkpoint holds (`KillWorker.keep_restored` saves them the way a checkpoint does)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from twinflow.models.export_loader import load_generator
from twinflow.train.averages import FILE_PATTERN
from twinflow.train.launcher import run_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reliability's job helpers
from reliability.helpers import EVAL, WORLD, check_finished, checkpoint_dirs, make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def z3_ema_job(shards, out: Path, name: str, *extra: str):
    return make_job(
        shards,
        out,
        name,
        "train.init_from=null",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=bf16",
        "method.teacher=ema",
        "method.ema_decay=0.9",
        "train.sample_ema=0.8",
        *extra,
        base="fashion_twinflow.yaml",
    )


@pytest.fixture(scope="module")
def killed(ray_cluster, fashion_small, tmp_path_factory):
    """kind -> the result of that job with rank 1 killed at step 3 (run on first use)."""
    out, results = tmp_path_factory.mktemp("z3_kill"), {}

    def get(kind: str):
        if kind not in results:
            extra = [*EVAL, "train.max_failures=1", *(["model.lora.rank=4"] if kind == "lora" else [])]
            results[kind] = run_job(z3_ema_job(fashion_small, out, f"z3_ema_{kind}", *extra), fault_at_step=3)
        return results[kind]

    return get


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, fashion_small, tmp_path_factory):
    """The full fine-tune job of `killed` without the kill."""
    return run_job(z3_ema_job(fashion_small, tmp_path_factory.mktemp("z3_clean"), "z3_ema_clean"))


def finished_run(result) -> Path:
    run = check_finished(result, 4)
    assert (run / ".injected_failure_step3").exists()  # the process really died once
    return run


def restored_checkpoint(run: Path) -> Path:
    """The one checkpoint the resume restored, as checkpoints.log names it: the step-2 one."""
    lines = (run / "logs" / "checkpoints.log").read_text()
    found = re.findall(r"restored checkpoint (\S+) \(step (\d+)\)", lines)
    assert len(found) == 1 and found[0][1] == "2", lines  # one restore, not a restart at step 0
    assert "fell back to" not in lines and "skipping" not in lines
    return Path(found[0][0])


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal nested state: tensors bit for bit, everything else by ==."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        assert torch.equal(got, want), where
    else:
        assert got == want, where


def updates(state: Any) -> list[int]:
    """num_updates of every decay schedule in an averages state (the teacher's and the sampling EMA's)."""
    if not isinstance(state, dict):
        return []
    if "num_updates" in state:
        return [state["num_updates"]]
    return [n for v in state.values() for n in updates(v)]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_every_rank_restores_the_averages_its_checkpoint_saved(killed, kind):
    run = finished_run(killed(kind))
    ckpts = checkpoint_dirs(run)
    assert ckpts
    files = [FILE_PATTERN.format(rank=r) for r in range(WORLD)]
    for c in ckpts:  # one averages file per rank, each with its own part
        assert sorted(p.name for p in c.glob(FILE_PATTERN.format(rank="*"))) == files
    saved_dir, restored_dir = restored_checkpoint(run), run / "logs" / "restored_averages" / "step2"
    for name in files:
        saved = torch.load(saved_dir / name, weights_only=True)
        restored = torch.load(restored_dir / name, weights_only=True)
        # both averages advanced past their first updates: a restore that kept freshly built ones
        # (0 updates, the weights of the start) differs here
        assert sorted(updates(saved)) == [2, 2], updates(saved)
        assert_same(restored, saved, name)
    gen, meta = load_generator(run / "export")  # the sampling EMA, gathered
    assert meta["lora"] is not None if kind == "lora" else meta["lora"] is None
    assert all(torch.isfinite(p).all() for p in gen.parameters())


def test_the_resumed_run_logs_and_exports_as_an_uninterrupted_one(killed, uninterrupted):
    """ZeRO-3 shards restored after the kill: the resumed run logs the same steps as the uninterrupted
    run and its export (the shards gathered into a whole model) has the same parameters and shapes.
    Their losses are not compared: two workers draw their batches from a stream whose block order
    between ranks is not fixed, so the same job gives other batches run to run."""
    run = finished_run(killed("full"))
    assert uninterrupted.ok and uninterrupted.steps == 4, uninterrupted.error
    clean = Path(uninterrupted.run_dir)
    rows = {}
    for name, r in (("kill", run), ("clean", clean)):
        rows[name] = {
            x["step"]: x for x in map(json.loads, (r / "logs" / "metrics.jsonl").read_text().splitlines())
        }
    # the killed run's steps 1-2 from before the kill, 3-4 after it
    assert sorted(rows["kill"]) == sorted(rows["clean"]) == [1, 2, 3, 4]
    gen, _ = load_generator(run / "export")
    ref, _ = load_generator(clean / "export")
    got, want = gen.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
    assert all(torch.isfinite(v).all() for v in got.values())
