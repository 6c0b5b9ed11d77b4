"""The driver's view of rank 0's lines (twinflow.train.progress.FollowLines): each appended line once,
nothing written before it started, no half-written line, checkpoint-log timestamps dropped."""

from __future__ import annotations

import os

from twinflow.train.progress import FollowLines, ProgressLog


def test_each_new_line_is_emitted_once(tmp_path):
    progress, ckpt = tmp_path / "progress.log", tmp_path / "checkpoints.log"
    say = ProgressLog(progress)
    say("step 1/9 | from an earlier attempt")  # already there: not shown again
    seen: list[str] = []
    follow = FollowLines([progress, ckpt], seen.append, strip_stamp=(ckpt,))
    say("step 2/9 | loss 1.0")
    with progress.open("a") as fh:
        fh.write("step 3/9 | half")  # being written
    ckpt.write_text("2026-11-30T07:00:00Z resuming from checkpoint_x (step 2)\n")
    follow.poll()
    assert seen == ["step 2/9 | loss 1.0", "resuming from checkpoint_x (step 2)"]
    with progress.open("a") as fh:
        fh.write(" written\n")
    with follow:  # the thread polls; leaving it polls a last time
        pass
    assert seen[2:] == ["step 3/9 | half written"]


def test_verbose_is_accepted_anywhere_and_reaches_the_ray_start_up(monkeypatch, tmp_path, capsys):
    import logging

    from twinflow.cli import main
    from twinflow.train.launcher import VERBOSE_ENV

    monkeypatch.setenv(VERBOSE_ENV, "")  # recorded, so whatever main() sets is undone after
    monkeypatch.delenv(VERBOSE_ENV)
    ours = logging.getLogger("twinflow")
    monkeypatch.setattr(ours, "handlers", list(ours.handlers))  # main() installs its handler: undone after
    monkeypatch.setattr(ours, "level", ours.level)
    assert main(["train", str(tmp_path / "none.yaml")]) == 2  # a clean error, quiet mode
    assert VERBOSE_ENV not in os.environ
    assert logging.getLogger("twinflow").level == logging.INFO
    assert main(["train", str(tmp_path / "none.yaml"), "--verbose"]) == 2
    assert os.environ[VERBOSE_ENV] == "1"  # ensure_ray forwards Ray's output then
    assert logging.getLogger("twinflow").level == logging.DEBUG
    assert "none.yaml" in capsys.readouterr().err
