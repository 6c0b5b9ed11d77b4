"""Evaluation: judges, quality metrics per NFE, and `twinflow eval` (Ray Data sampling at the edge).

| module | holds |
|---|---|
| `datasets.py` | classes, caption templates, prompt -> class, the real train / held-out splits |
| `judges.py` | the judge CNN, shipped weights (`weights/*.safetensors`), `train_judge`, `load_judge` |
| `metrics.py` | Fréchet distance, adherence, diversity, PSNR; `real_reference`; `evaluate_generator` (plain torch) |
| `sampling.py` | NFE lists, `few` / `ode` samplers, deterministic noise per sample unit |
| `checkpoints.py` | find an export, the data and dataset its run was trained on |
| `edits.py` | image editors: edit pairs, sampling with the source as reference, MSE/PSNR/judged class, grids (the one edit scoring path) |
| `job.py` | `run_eval`: checkpoints x NFE sampled on a Ray Data actor pool, scored, reported |
| `report.py` | JSON, markdown table, sample grids |
| `cli.py` | `twinflow eval ...`, `twinflow judges train|accuracy ...` |

Importing `twinflow.eval` (or `.metrics`, `.judges`) imports neither Ray nor diffusers.
"""

from __future__ import annotations

from twinflow.lazy import lazy_names

_NAMES = {
    "evaluate_generator": "twinflow.eval.metrics",
    "real_reference": "twinflow.eval.metrics",
    "frechet_distance": "twinflow.eval.metrics",
    "load_judge": "twinflow.eval.judges",
    "train_judge": "twinflow.eval.judges",
    "get_dataset": "twinflow.eval.datasets",
    "run_eval": "twinflow.eval.job",
    "EvalRequest": "twinflow.eval.job",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _NAMES)
