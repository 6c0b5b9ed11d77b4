"""The sharded averages under real DeepSpeed on 2 CPU ranks (gloo): after N steps the EMA each rank
holds in part, gathered, equals the whole-copy EMA fed the same online weights; the teacher answers
with it under ZeRO-3's own gathering and leaves the online model as it was; each rank holds about
half of the trainable weights (a LoRA job: the adapter whole, E2 and the text projection in half)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("averages_ranks.py")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_ranks(stage: int, kind: str, out: Path, world: int = 2) -> dict:
    port = _port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(r), str(world), port, str(stage), kind, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    return json.loads((out / "result.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("stage", "kind"), [(3, "full"), (3, "lora"), (2, "full")])
def test_the_sharded_average_gathered_equals_the_whole_copy(tmp_path, stage, kind):
    res = run_ranks(stage, kind, tmp_path)
    # fp32 lerps of the same values in the same order: equal up to the last bit or two
    assert res["max_abs_error"]["teacher"] < 1e-6, res
    assert res["max_abs_error"]["sampling"] < 1e-6, res
    assert res["sampling_module_error"] < 1e-6, res
    # forwards through ZeRO-3's gathering vs a plain module: the same fp32 weights, summation order aside
    assert res["teacher_vs_reference"] < 1e-5, res
    assert res["teacher_vs_online"] > 1e-3, res  # it is not the online model answering
    assert res["online_unchanged"], res
    assert res["checkpoint_roundtrip"], res
    per_rank, total = res["shard_numel_per_rank"], res["trainable_numel"]
    assert len(per_rank) == 2
    for n in per_rank:  # half of every flat weight, rounded up per weight
        assert total / 2 <= n <= total / 2 + res["teacher_names"], res
