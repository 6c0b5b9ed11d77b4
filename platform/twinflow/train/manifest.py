"""Per-rank checkpoint manifests: size and sha256 of every file a rank wrote, verified before a restore.

Random bytes inside a tensor file once restored silently (NaN weights, all-black exports) and a
truncated file failed without naming itself. Each rank now writes `manifest.rank<R>.json` after its
files (atomically, so a manifest is never half there); a checkpoint is good only when every rank's
manifest is present and every listed file has its recorded size and digest. A checkpoint cut off
mid-upload lacks a manifest or a file, so it fails the same check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.json$")
FORMAT = 1


def manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    directory: str | Path, rank: int, world: int, step: int, zero_stage: int | None = None
) -> Path:
    """Record every file under `directory` (this rank's checkpoint files); call after writing them."""
    root = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if MANIFEST_RE.match(rel) or rel.endswith(".tmp"):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    body = {"format": FORMAT, "rank": rank, "world": world, "step": step, "files": files}
    if (
        zero_stage is not None
    ):  # with `world`, the layout of the optimizer state (see checkpointing.layout_of)
        body["zero_stage"] = zero_stage
    final = root / manifest_name(rank)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, final)  # atomic: a reader sees the whole manifest or none
    return final


def read_manifests(directory: str | Path) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """{rank: manifest} of a checkpoint directory, and problems reading them."""
    root = Path(directory)
    found: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for path in sorted(root.glob("manifest.rank*.json")):
        m = MANIFEST_RE.match(path.name)
        if not m:
            continue
        try:
            body = json.loads(path.read_text())
            if not isinstance(body.get("files"), dict) or not isinstance(body.get("world"), int):
                raise ValueError("missing 'files' or 'world'")
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable manifest ({exc})")
            continue
        found[int(m.group(1))] = body
    return found, problems


def verify(directory: str | Path) -> list[str]:
    """Problems that make this checkpoint unusable (empty list: every file verified)."""
    root = Path(directory)
    manifests, problems = read_manifests(root)
    if not manifests and not problems:
        return [f"no {manifest_name(0)} (cut off before it was complete, or written without manifests)"]
    worlds = {m["world"] for m in manifests.values()}
    if len(worlds) > 1:
        problems.append(f"ranks disagree on the world size: {sorted(worlds)}")
    world = max(worlds) if worlds else 0
    missing = [r for r in range(world) if r not in manifests]
    if missing:
        problems.append(f"missing manifests of rank(s) {missing}")
    for rank, body in sorted(manifests.items()):
        problems += check_files(root, body["files"], f"rank {rank}")
    return problems


def check_files(root: Path, files: dict[str, dict[str, Any]], owner: str) -> list[str]:
    """Each listed file under `root` present with its recorded size and sha256 (`owner` names the
    manifest in a missing file's line)."""
    problems = []
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing ({owner})")
        elif path.stat().st_size != meta.get("size"):
            problems.append(f"{rel}: {path.stat().st_size} bytes, {meta.get('size')} expected (truncated?)")
        elif file_digest(path) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (corrupted)")
    return problems


def manifest_step(directory: str | Path) -> int | None:
    """The step the manifests record (None without a readable one)."""
    manifests, _ = read_manifests(directory)
    steps = {m.get("step") for m in manifests.values()}
    return steps.pop() if len(steps) == 1 else None
