"""Resume on another layout: a checkpoint written by N workers at one ZeRO stage, restored by M workers
at another, through DeepSpeed's universal checkpoint format.

The conversion runs once per checkpoint, on the driver before Ray starts (`prepare`), and writes
`<checkpoint>/universal/` beside the native `ckpt/` files, with its own manifest
(`manifest.universal.json`: sha256 of every converted file, the source layout) so a restore verifies it
like any checkpoint. Every later layout resumes from that one folder.

DeepSpeed's `ds_to_universal` gathers ZeRO-1/2/3 partitions into one file per parameter and state, but
its two paths write different files: the ZeRO-1/2 path `{"param": tensor}` in the parameter's shape plus
a `step.pt`, the ZeRO-3 path bare flat tensors and no step; ZeRO-1/2's loader reads `["param"]` and
`step.pt`, ZeRO-3's reads the step from `optimizer_state.pt`, whose ZeRO-1/2 version lacks it. Loaded
as written, a ZeRO-3 conversion fails in a ZeRO-1/2 engine, and a ZeRO-2 one fails in a ZeRO-3 engine.
`canonicalise` rewrites both into one form every loader reads. A run on one worker at ZeRO-1/2 runs
stage 0 (no ZeRO optimizer, `engine.zero_stage_for`), which DeepSpeed's format does not cover at all:
`write_from_stage0` and `load_into_stage0` handle those checkpoints and engines with the same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from twinflow.storage import download_dir, is_s3, upload_dir
from twinflow.train import manifest

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"  # inside a Ray checkpoint directory, beside the native tag folder
UNIVERSAL_MANIFEST = "manifest.universal.json"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
TRAINABLE_KEY = "trainable_names"  # client state: the optimizer's parameters by name, in its order
# what DeepSpeed keeps in its model-states file beside the client state (not handed back as client state)
DEEPSPEED_KEYS = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "ds_config",
        "ds_version",
        "num_experts",
        "ds_autoep_layers",
        "universal_checkpoint_info",
    }
)


class RelayoutError(RuntimeError):
    """A checkpoint cannot be carried to this layout; the message says why and what to do."""


def universal_dir(checkpoint: str | Path, tag: str) -> Path:
    return Path(checkpoint) / UNIVERSAL_DIR / tag


def verify(checkpoint: str | Path) -> list[str]:
    """Problems of a checkpoint's universal conversion ([] when every converted file verifies;
    a missing conversion is one problem)."""
    root = Path(checkpoint)
    path = root / UNIVERSAL_MANIFEST
    if not path.is_file():
        return [f"no {UNIVERSAL_MANIFEST} (never converted)"]
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not a mapping")
    except (OSError, ValueError, KeyError) as exc:
        return [f"{UNIVERSAL_MANIFEST}: unreadable ({exc})"]
    return manifest.check_files(root, files, "universal")


def record(checkpoint: str | Path) -> dict[str, Any]:
    """The conversion's manifest body ({} when there is none)."""
    path = Path(checkpoint) / UNIVERSAL_MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def convert(checkpoint: str | Path, tag: str) -> Path:
    """Write `<checkpoint>/universal/<tag>/` from the native files and its manifest; once (a verified
    conversion is kept). The checkpoint's own manifests must verify first."""
    root = Path(checkpoint)
    if not verify(root):
        return universal_dir(root, tag)
    problems = manifest.verify(root)
    if problems:
        raise RelayoutError(
            f"{root}: cannot convert a checkpoint that does not verify: {'; '.join(problems[:3])}"
        )
    ranks, _ = manifest.read_manifests(root)
    source = ranks[0]
    stage = source.get("zero_stage")
    src = root / tag
    out = universal_dir(root, tag)
    shutil.rmtree(root / UNIVERSAL_DIR, ignore_errors=True)  # a conversion cut off earlier
    (root / UNIVERSAL_MANIFEST).unlink(missing_ok=True)
    try:
        if any(src.glob("*optim_states.pt")):
            _ds_to_universal(src, out)
            canonicalise(out)
        elif stage in (0, None):
            write_from_stage0(src, out)
        else:
            raise RelayoutError(f"ZeRO stage {stage} checkpoint without optimizer partition files")
    except RelayoutError as exc:
        shutil.rmtree(root / UNIVERSAL_DIR, ignore_errors=True)
        raise RelayoutError(f"{root}: {exc}") from None
    except Exception as exc:  # DeepSpeed's converter asserts and raises whatever it meets
        shutil.rmtree(root / UNIVERSAL_DIR, ignore_errors=True)
        raise RelayoutError(
            f"{root}: the conversion to a universal checkpoint failed ({type(exc).__name__}: {exc})"
        ) from exc
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": manifest.file_digest(p)}
        for p in sorted((root / UNIVERSAL_DIR).rglob("*"))
        if p.is_file()
    }
    body = {
        "format": 1,
        "step": source["step"],
        "source": {"world": source["world"], "zero_stage": stage},
        "files": files,
    }
    tmp = root / (UNIVERSAL_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, root / UNIVERSAL_MANIFEST)  # last: it vouches for the files above
    return out


def _ds_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter, in this process (one extract/merge worker: no process pool to spawn)."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(src),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # our checkpoints carry no universal_checkpoint_info (no tensor/pipeline parallel patterns)
        inject_missing_state=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    said = io.StringIO()  # its step-by-step prints and progress bars: kept out of the job's output
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", said.getvalue())


def _model_states(folder: Path) -> dict[str, Any]:
    """Rank 0's model-states file (DeepSpeed's: its config and shapes are pickled objects, so it
    loads with weights_only=False; see docs/reliability.md on who may write checkpoints)."""
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise RelayoutError(f"{folder}: no DeepSpeed model-states file")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def _param_shapes(states: dict[str, Any]) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    for group in states.get("param_shapes") or []:
        shapes.update(group)
    return shapes


def canonicalise(out: Path) -> None:
    """One form for every loader: each state `{"param": tensor}` in the parameter's shape, a `step.pt`
    per parameter, and an `optimizer_state.pt` with the ZeRO-1/2 keys and ZeRO-3's step."""
    states = _model_states(out)
    shapes = _param_shapes(states)
    zero = out / "zero"
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    inner = common.get("optimizer_state_dict") or {}
    step = None
    for st in (inner.get("state") or {}).values():
        step = st.get("step")
        break
    groups = common.get("param_groups") or inner.get("param_groups")
    for name, shape in shapes.items():
        pdir = zero / name
        if not (pdir / "fp32.pt").is_file():
            raise RelayoutError(f"no converted fp32 state for parameter {name}")
        for key in STATES:
            t = torch.load(pdir / f"{key}.pt", map_location="cpu", weights_only=True)
            t = t["param"] if isinstance(t, dict) else t
            torch.save({"param": t.reshape(shape).float()}, pdir / f"{key}.pt")
        step_file = pdir / "step.pt"
        if step_file.is_file():
            step = torch.load(step_file, map_location="cpu", weights_only=True)
        elif step is None:
            raise RelayoutError(f"no optimizer step recorded for {name}")
        else:
            torch.save(step, step_file)
    if step is None:
        raise RelayoutError("the converted checkpoint holds no optimizer step")
    _write_common(zero, common, groups, step)
    _both_model_state_names(out)


def _write_common(zero: Path, common: dict[str, Any], groups: list[dict], step) -> None:
    import deepspeed

    body = {
        k: v
        for k, v in common.items()
        if k not in ("optimizer_state_dict", "param_groups", "base_optimizer_state")
    }
    body.setdefault("ds_version", deepspeed.__version__)
    body.setdefault("clip_grad", 0.0)
    body["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    body["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": body["param_groups"]}
    torch.save(body, zero / "optimizer_state.pt")


def write_from_stage0(src: Path, out: Path) -> None:
    """A stage-0 checkpoint (one worker, plain torch optimizer inside DeepSpeed's model-states file) in
    the canonical universal form. The optimizer's parameters are named by the client state's
    `trainable_names`, which `checkpointing.save` records."""
    states = _model_states(src)
    names = states.get(TRAINABLE_KEY)
    if not names:
        raise RelayoutError(
            f"{src}: this one-worker checkpoint does not name its optimizer's parameters (written "
            f"before resume on another layout existed); resume it on one worker"
        )
    optim = states.get("optimizer")
    if not isinstance(optim, dict) or "state" not in optim:
        raise RelayoutError(f"{src}: no optimizer state in the model-states file")
    module = states["module"]
    order = [i for g in optim["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise RelayoutError(f"{src}: {len(order)} optimizer parameters, {len(names)} names recorded")
    zero = out / "zero"
    # torch's AdamW counts steps per parameter and skips a parameter without a gradient, so a
    # parameter some steps left unused (a branch not taken) lags; ZeRO keeps one step per flat group
    # and its loader requires them equal: every parameter takes the optimizer's step count, the most
    # any parameter took (its moments are carried exactly).
    counts = [optim["state"].get(i, {}).get("step", torch.tensor(0.0)) for i in order]
    step = max(counts, key=float) if counts else torch.tensor(0.0)
    for idx, name in zip(order, names):
        st = optim["state"].get(idx, {})
        weight = module[name].float()
        pdir = zero / name
        pdir.mkdir(parents=True, exist_ok=True)
        torch.save({"param": weight}, pdir / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": st.get(key, torch.zeros_like(weight)).float()}, pdir / f"{key}.pt")
        torch.save(step, pdir / "step.pt")
    common = {"clip_grad": float(states.get("ds_config", {}).get("gradient_clipping", 0.0) or 0.0)}
    _write_common(zero, common, optim["param_groups"], step)
    for f in src.glob("*model_states.pt"):
        shutil.copy2(f, out / f.name)
    _both_model_state_names(out)
    (out.parent / "latest_universal").write_text(out.name)


def _both_model_state_names(out: Path) -> None:
    """DeepSpeed looks for `zero_pp_rank_0_mp_rank_*_model_states.pt` in a ZeRO-3 engine and
    `mp_rank_*_model_states.pt` otherwise (the step counters and client state come from it): rank 0's
    file under both names, so a stage change finds it."""
    first = sorted(out.glob("*model_states.pt"))[0]
    for name in (MODEL_STATES, ZERO3_MODEL_STATES):
        if not (out / name).exists():
            shutil.copy2(first, out / name)


def load(engine, checkpoint: str | Path, tag: str) -> dict[str, Any]:
    """Load a checkpoint's universal conversion into `engine` (any world size and ZeRO stage); the
    client state it was saved with."""
    folder = universal_dir(checkpoint, tag)
    if engine.zero_optimization_stage() == 0:
        return load_into_stage0(engine, folder)
    # DeepSpeed reads this flag at load time only; a restore picks per checkpoint whether it loads the
    # native files (same layout) or the conversion, so it is set around this one load.
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(str(folder.parent), tag=tag)
    finally:
        cfg.load_universal_checkpoint = before
    if path is None:
        raise RelayoutError(f"{folder}: DeepSpeed found no universal checkpoint there")
    return client


@torch.no_grad()
def load_into_stage0(engine, folder: Path) -> dict[str, Any]:
    """The canonical universal files into a stage-0 engine: weights, the torch optimizer's Adam
    moments and step, DeepSpeed's step counters; the client state."""
    states = _model_states(folder)
    zero = folder / "zero"
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    named = {p: n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    opt = getattr(opt, "optimizer", opt)  # DeepSpeed may wrap the torch optimizer
    for group, saved in zip(opt.param_groups, common.get("param_groups") or []):
        for k, v in saved.items():
            if k != "params":
                group[k] = v
        for p in group["params"]:
            pdir = zero / named[p]
            if not (pdir / "fp32.pt").is_file():
                raise RelayoutError(f"{folder}: no converted state for parameter {named[p]}")
            p.copy_(torch.load(pdir / "fp32.pt", map_location="cpu", weights_only=True)["param"].view_as(p))
            st = opt.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = torch.load(pdir / f"{key}.pt", map_location="cpu", weights_only=True)["param"]
                st[key] = st[key].view_as(p).to(p.device, torch.float32).clone()
            step = torch.load(pdir / "step.pt", map_location="cpu", weights_only=True)
            st["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
    engine.global_steps = states["global_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states.get("skipped_steps", 0)
    return {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}


def prepare(
    newest: tuple[str, int, int | None] | None,
    run_uri: str,
    endpoint: str | None,
    world: int,
    zero_stage: int,
    tag: str,
) -> str | None:
    """Before Ray starts: when the run's newest checkpoint (`checkpointing.newest_layout`: path, world,
    stage) was written by another layout, convert it (once) and return its path; None when nothing needs
    converting. Remote checkpoints are fetched to a temporary folder, converted there, and the
    conversion uploaded beside them."""
    if newest is None:
        return None
    path, saved_world, saved_stage = newest
    if saved_world == world and (saved_stage is None or saved_stage == zero_stage):
        return None
    if not is_s3(run_uri):
        local = Path(path)
        if not verify(local):
            return path
        log.info(
            "converting %s (%d workers, ZeRO %s) to a universal checkpoint", path, saved_world, saved_stage
        )
        convert(local, tag)
        return path
    return _prepare_remote(path, run_uri, endpoint, tag)


def _prepare_remote(path: str, run_uri: str, endpoint: str | None, tag: str) -> str:
    uri = "s3://" + path.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="twinflow-relayout-") as tmp:
        local = Path(tmp) / "checkpoint"
        download_dir(uri, local, endpoint)
        if not verify(local):
            return uri
        convert(local, tag)
        staged = Path(tmp) / "upload"
        staged.mkdir()
        shutil.copytree(local / UNIVERSAL_DIR, staged / UNIVERSAL_DIR)
        shutil.copy2(local / UNIVERSAL_MANIFEST, staged / UNIVERSAL_MANIFEST)
        upload_dir(staged, uri, endpoint)
    return uri
