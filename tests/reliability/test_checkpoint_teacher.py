"""A resumed run continues its EMA teacher and its sampling EMA where the checkpoint left them: saved by
`checkpointing.save` as a rank-0 worker saves, restored by `checkpointing.restore` into freshly built
averages (which otherwise restart their warm-up from the new model's weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from twinflow.method.ema import EMA, Teacher, next_decay
from twinflow.train import checkpointing, manifest
from twinflow.train.launcher import run_job
from twinflow.train.modelling import Averages

from .helpers import checkpoint_dirs, make_job


class DirEngine:
    """The DeepSpeed engine's checkpoint contract on one process: save_checkpoint writes the module's
    weights and the client state under `tag`, load_checkpoint reads them back into the module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, d, tag, client_state):
        (Path(d) / tag).mkdir(parents=True)
        torch.save({"module": self.module.state_dict(), **client_state}, Path(d) / tag / "model_states.pt")

    def load_checkpoint(self, d, tag):
        saved = torch.load(Path(d) / tag / "model_states.pt", weights_only=False)
        self.module.load_state_dict(saved["module"])
        return str(d), {k: v for k, v in saved.items() if k != "module"}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 3))


def _averages(model: nn.Module) -> Averages:
    return Averages(Teacher(model, "ema", decay=0.9), EMA(model, 0.95))


def _train(model: nn.Module, averages: Averages, steps: int) -> None:
    """Weight changes followed by the updates a training step makes."""
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        averages.teacher.update()
        averages.sample_ema.update(model)


def _save_as_rank0(tmp_path: Path, monkeypatch, engine, averages, step: int) -> Path:
    """One checkpoint directory as Ray Train stores it, written by `checkpointing.save`."""
    import ray.train

    run = tmp_path / "run"
    reported = run / f"checkpoint_2026-12-01_00-00-{step:02d}.000000"

    class _Context:
        def get_world_size(self) -> int:
            return 1

    def report(metrics, checkpoint):
        shutil.copytree(checkpoint.path, reported)

    monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
    monkeypatch.setattr(ray.train, "report", report)
    checkpointing.save(engine, averages, checkpointing.TrainState(step=step), 0, {"loss": 0.0})
    return run


def _state(averages: Averages) -> dict:
    return {"teacher": averages.teacher.state_dict(), "sample_ema": averages.sample_ema.state_dict()}


def _assert_same(a, b, where="state") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_restores_the_ema_teacher_and_the_sampling_ema(tmp_path, monkeypatch):
    import ray.train

    model = _model(0)
    averages = _averages(model)
    _train(model, averages, steps=5)
    saved = _state(averages)
    run = _save_as_rank0(tmp_path, monkeypatch, DirEngine(model), averages, step=5)
    (ckpt,) = run.iterdir()
    assert (ckpt / checkpointing.TEACHER_FILE).is_file() and manifest.verify(ckpt) == []

    # the resumed worker builds everything anew from another initialisation, then restores
    resumed_model = _model(1)
    resumed = _averages(resumed_model)
    assert resumed.teacher.ema.num_updates == 0
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(ckpt)))
    log = tmp_path / "checkpoints.log"
    state = checkpointing.restore(DirEngine(resumed_model), resumed, str(run), log_file=log)
    assert state.step == 5
    assert log.read_text().endswith(f" restored checkpoint {ckpt} (step 5)\n")  # not "fell back to"
    _assert_same(saved, _state(resumed))
    assert resumed.teacher.ema.num_updates == 5 and resumed.teacher.decay == averages.teacher.decay

    # and the next step's teacher equals the uninterrupted run's
    torch.manual_seed(7)
    _train(model, averages, steps=1)
    torch.manual_seed(7)
    _train(resumed_model, resumed, steps=1)
    _assert_same(_state(averages), _state(resumed))


def test_a_checkpoint_without_the_sampling_ema_is_refused_when_the_job_sets_one(tmp_path, monkeypatch):
    import ray.train

    model = _model(0)
    teacher_only = Averages(Teacher(model, "ema", decay=0.9), None)
    teacher_only.teacher.update()
    run = _save_as_rank0(tmp_path, monkeypatch, DirEngine(model), teacher_only, step=2)
    (ckpt,) = run.iterdir()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(ckpt)))
    with pytest.raises(ValueError, match="no sampling EMA but train.sample_ema is set"):
        checkpointing.restore(DirEngine(_model(1)), _averages(_model(1)), str(run))


def test_ranks_that_disagree_on_the_world_size_fail_verification(tmp_path):
    ck = tmp_path / "c"
    for rank, world in ((0, 2), (1, 1)):
        part = tmp_path / f".rank{rank}"
        (part / "ckpt").mkdir(parents=True)
        torch.save({"w": torch.ones(4)}, part / "ckpt" / f"zero_rank{rank}_states.pt")
        manifest.write_manifest(part, rank, world, 4)
        shutil.copytree(part, ck, dirs_exist_ok=True)
    assert manifest.verify(ck) == ["ranks disagree on the world size: [1, 2]"]


FASHION_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "fashion_base"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_killed_twinflow_run_resumes_its_ema_teacher(ray_cluster, fashion_small, tmp_path):
    """2 workers, TwinFlow with an EMA teacher and a sampling EMA; rank 1 dies at step 3 and Ray Train
    restarts the group from the step-2 checkpoint. The averages then carry the 2 updates made before
    the crash: at step 4 each has made 4 (a restarted EMA would count 2 and restart its warm-up)."""
    result = run_job(
        make_job(
            fashion_small,
            tmp_path,
            "ema_kill",
            "method.teacher=ema",
            "method.ema_decay=0.9",
            "train.sample_ema=0.95",
            f"train.init_from={FASHION_BASE}",
            "train.fail_at_step=3",
            "train.max_failures=1",
            base="fashion_twinflow.yaml",
        )
    )
    assert result.ok, result.error
    run = Path(result.run_dir)
    assert (run / ".injected_failure_step3").exists()  # the worker really died once
    assert "restored checkpoint" in (run / "logs" / "checkpoints.log").read_text()
    assert "(step 2)" in (run / "logs" / "checkpoints.log").read_text()
    c2, c4 = checkpoint_dirs(run)
    saved = torch.load(c2 / checkpointing.TEACHER_FILE, weights_only=False)
    final = torch.load(c4 / checkpointing.TEACHER_FILE, weights_only=False)
    decay = {"ema": 0.0, "sample_ema": 0.0}
    for k, target in (("ema", 0.9), ("sample_ema", 0.95)):
        for _ in range(2):
            decay[k] = next_decay(decay[k], target)
        assert saved[k]["num_updates"] == 2 and saved[k]["current_decay"] == pytest.approx(decay[k])
        for _ in range(2):
            decay[k] = next_decay(decay[k], target)
        assert final[k]["num_updates"] == 4 and final[k]["current_decay"] == pytest.approx(decay[k])
