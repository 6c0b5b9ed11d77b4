"""Ray Train merges the ranks' checkpoint folders into one: ranks that wrote for different world sizes
(a checkpoint mixed from two runs) must not verify."""

from __future__ import annotations

import shutil

import torch

from twinflow.train import manifest


def test_ranks_that_disagree_on_the_world_size_fail_verification(tmp_path):
    ck = tmp_path / "c"
    for rank, world in ((0, 2), (1, 1)):
        part = tmp_path / f".rank{rank}"
        (part / "ckpt").mkdir(parents=True)
        torch.save({"w": torch.ones(4)}, part / "ckpt" / f"zero_rank{rank}_states.pt")
        manifest.write_manifest(part, rank, world, 4)
        shutil.copytree(part, ck, dirs_exist_ok=True)
    assert manifest.verify(ck) == ["ranks disagree on the world size: [1, 2]"]
