"""DeepSpeed's own per-step cost without Ray: a plain torch loop vs the DeepSpeed engine at ZeRO-0 and
ZeRO-2, one process, one thread, on the tiny and small Qwen-Image presets (CPU or one GPU).

    .venv/bin/python benchmarks/deepspeed_overhead.py      # ~2 min on 2 CPU cores; prints one JSON line per preset
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train_step as steps

from twinflow.method.config import FlowMatchingConfig
from twinflow.models.config import ModelConfig
from twinflow.train.sections import DeepSpeedConfig


def main() -> int:
    torch.set_num_threads(1)
    steps.init_dist()
    fm = FlowMatchingConfig(name="flow_matching", loss="mse")
    for preset, n in [("tiny-28g", 40), ("small-28g", 12)]:
        model = ModelConfig(family="qwen_image", preset=preset, text_max_length=16)
        out = {"preset": preset, "plain_s": steps.run_plain(model, fm, 32, n)["step_s"]}
        for zero in (0, 2):
            out[f"deepspeed_z{zero}_s"] = steps.run_engine(
                model, fm, DeepSpeedConfig(zero_stage=zero), 32, n
            )["step_s"]
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
