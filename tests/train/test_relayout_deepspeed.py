"""Resume on another layout with real DeepSpeed runs (gloo processes, no Ray): 2 -> 1 -> 2 workers at
ZeRO-2 (the one-worker leg runs stage 0, as `engine.zero_stage_for` makes it) and at ZeRO-3, and
ZeRO-2 -> ZeRO-3 on the same workers. The restored weights, Adam moments and Adam step equal the
saved ones exactly: the conversion only moves fp32 values between files (no arithmetic), so any
difference would be a misplaced or lost element. The step count and the lr schedule carry on, and the
resumed losses follow an uninterrupted 2-worker run within 1e-5 relative: one worker averages the
8-row batch in one sum, two workers average two 4-row means through an all-reduce, which differ in the
last bits (measured on the ZeRO-2 chain: at most 1.5e-8 on the states, 1e-7 relative on the losses).
`tests/train/relayout_worker.py` is the run; the test chains them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinflow.train import relayout
from twinflow.train.checkpointing import TAG, Unusable, load_directory, newest_layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

WORKER = Path(__file__).with_name("relayout_worker.py")
LOSS_RTOL = 1e-5


class Runs:
    """Each run once per module, by its arguments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, dict] = {}

    def __call__(self, name: str, world: int, stage: int, steps: int, **kw) -> dict:
        if name not in self.done:
            out = self.root / f"{name}.pt"
            cmd = [sys.executable, str(WORKER), "--world", str(world), "--stage", str(stage)]
            cmd += ["--steps", str(steps), "--out", str(out)]
            if "save_at" in kw:
                cmd += ["--save", str(self.root / name), "--save-at", str(kw["save_at"])]
            if "resume" in kw:
                relayout.convert(self.root / kw["resume"], TAG)  # what the launcher does before Ray starts
                cmd += ["--resume", str(self.root / kw["resume"])]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-3000:]
            self.done[name] = torch.load(out, weights_only=True)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("relayout"))


def assert_same_states(restored: dict, saved: dict) -> None:
    assert restored.keys() == saved.keys() and saved
    for name, states in saved.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[name][key], states[key]), (name, key)


def assert_losses_follow(resumed: dict, reference: dict, steps) -> None:
    for step in steps:
        got, want = resumed["losses"][step], reference["losses"][step]
        assert abs(got - want) <= LOSS_RTOL * abs(want), (step, got, want)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_to_one_to_two_workers(runs, stage):
    # two workers save at step 3 and go on to step 8: the uninterrupted reference
    first = runs(f"z{stage}_w2", 2, stage, 8, save_at=3)
    one_stage = 0 if stage == 2 else 3  # engine.zero_stage_for: one worker at ZeRO-1/2 runs stage 0
    one = runs(f"z{stage}_w1", 1, one_stage, 6, save_at=6, resume=f"z{stage}_w2")
    assert one["restored_step"] == 3 and one["engine_steps"] == 3
    assert_same_states(one["restored"], first["saved"])
    assert one["lr"] == {
        s: first["lr"][s] for s in (4, 5, 6)
    }  # the warm-up schedule carries on (step 4 of 4)
    assert_losses_follow(one, first, (4, 5, 6))

    two = runs(f"z{stage}_w2_again", 2, stage, 8, resume=f"z{stage}_w1")
    assert two["restored_step"] == 6 and two["engine_steps"] == 6
    assert_same_states(two["restored"], one["saved"])
    assert_losses_follow(two, first, (7, 8))
    for name, states in first["final"].items():  # and the end state is the reference's, up to summation order
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(two["final"][name][key], states[key], rtol=1e-5, atol=1e-7)


def test_zero2_to_zero3_on_the_same_workers(runs):
    first = runs("z2_w2", 2, 2, 8, save_at=3)
    three = runs("z2_to_z3", 2, 3, 5, resume="z2_w2")
    assert three["restored_step"] == 3
    assert_same_states(three["restored"], first["saved"])
    assert_losses_follow(three, first, (4, 5))


def test_the_conversion_is_verified_like_any_checkpoint(runs):
    runs("z2_w2", 2, 2, 8, save_at=3)
    checkpoint = runs.root / "z2_w2"
    relayout.convert(checkpoint, TAG)
    body = relayout.record(checkpoint)
    assert body["step"] == 3 and body["source"] == {"world": 2, "zero_stage": 2}
    assert relayout.verify(checkpoint) == []
    mtime = (checkpoint / relayout.UNIVERSAL_MANIFEST).stat().st_mtime_ns
    relayout.convert(checkpoint, TAG)  # converted once: a verified conversion is kept
    assert (checkpoint / relayout.UNIVERSAL_MANIFEST).stat().st_mtime_ns == mtime

    victim = next((checkpoint / relayout.UNIVERSAL_DIR).rglob("exp_avg.pt"))
    raw = bytearray(victim.read_bytes())
    raw[-8] ^= 0xFF
    victim.write_bytes(bytes(raw))
    problems = relayout.verify(checkpoint)
    assert len(problems) == 1 and "exp_avg.pt: sha256 mismatch" in problems[0]

    class OneWorker:  # what load_directory asks of an engine before it loads anything
        dp_world_size = 1

        @staticmethod
        def zero_optimization_stage():
            return 0

    with pytest.raises(Unusable, match=r"written by 2 worker\(s\) at ZeRO stage 2, this run has 1 worker"):
        load_directory(OneWorker(), None, checkpoint)
    relayout.convert(checkpoint, TAG)  # a conversion that no longer verifies is redone
    assert relayout.verify(checkpoint) == []


def test_a_checkpoint_on_s3_is_converted_beside_its_files(runs, s3_server, bucket, tmp_path):
    from twinflow.storage import download_dir, upload_dir

    runs("z3_w2", 2, 3, 8, save_at=3)
    source = tmp_path / "native"
    shutil.copytree(
        runs.root / "z3_w2", source, ignore=shutil.ignore_patterns("universal", "*.universal.json")
    )
    run_uri = f"s3://{bucket}/runs/job"
    upload_dir(source, f"{run_uri}/checkpoint_2026-12-06_07-00-00.000000", s3_server)
    assert relayout.prepare(newest_layout(run_uri, s3_server), run_uri, s3_server, 1, 3, TAG).endswith(
        "checkpoint_2026-12-06_07-00-00.000000"
    )
    back = tmp_path / "back"
    download_dir(f"{run_uri}/checkpoint_2026-12-06_07-00-00.000000", back, s3_server)
    assert relayout.verify(back) == [] and relayout.record(back)["source"] == {"world": 2, "zero_stage": 3}
    assert (
        relayout.prepare(newest_layout(run_uri, s3_server), run_uri, s3_server, 2, 3, TAG) is None
    )  # the layout that wrote it: nothing to do
