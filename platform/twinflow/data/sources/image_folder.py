"""A user's own images: a folder with `.txt` caption sidecars, or a JSONL/CSV index of (path, caption)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from twinflow.data.bad_records import SkipRecord
from twinflow.data.config import ImageFolderSource as ImageFolderConfig
from twinflow.data.sources.base import Source, SourceItem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _record_id(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return "img-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


class ImageFolder(Source):
    def __init__(self, cfg: ImageFolderConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.mode = cfg.mode
        self.entries: list[tuple[Path, str | None, str]] = []  # (image path, caption or None, id)
        if cfg.index:
            self._load_index(Path(cfg.index))
        else:
            self._scan(Path(cfg.path))
        if not self.entries:
            raise FileNotFoundError(f"no images found ({cfg.index or cfg.path})")

    def _scan(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        pattern = "**/*" if self.cfg.recursive else "*"
        for path in sorted(root.glob(pattern)):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                rel = path.relative_to(root).as_posix()
                sidecar = path.with_suffix(".txt")
                caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
                self.entries.append((path, caption, _record_id(rel)))

    def _load_index(self, index: Path) -> None:
        if not index.is_file():
            raise FileNotFoundError(f"index file not found: {index}")
        base = Path(self.cfg.path) if self.cfg.path else index.parent
        rows: list[dict[str, Any]] = []
        if index.suffix.lower() == ".jsonl":
            for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{index}:{n}: invalid JSON: {exc}") from None
        else:
            with index.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = {self.cfg.path_key, self.cfg.caption_key} - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(
                        f"{index}: CSV header lacks column(s) {sorted(missing)} (has {reader.fieldnames})"
                    )
                rows = list(reader)
        for n, row in enumerate(rows, 1):
            rel = row.get(self.cfg.path_key)
            if not rel:
                raise ValueError(f"{index}: record {n} has no {self.cfg.path_key!r}")
            caption = row.get(self.cfg.caption_key)
            self.entries.append(
                (base / rel, None if caption is None else str(caption).strip(), _record_id(str(rel)))
            )

    def splits(self) -> dict[str, int]:
        return {"all": len(self.entries)}

    def item(self, split: str, index: int) -> SourceItem:
        path, caption, rid = self.entries[index]
        if not path.is_file():
            raise SkipRecord("missing_file", rid, str(path))
        if not caption:
            raise SkipRecord("empty_caption", rid, f"no caption for {path.name}")
        try:
            with Image.open(path) as im:
                im.load()
                image = _flatten(im, self.mode)
        except Exception as exc:  # PIL raises many types for broken files
            raise SkipRecord("decode_error", rid, f"{path.name}: {exc}") from None
        return SourceItem(id=rid, image=image, caption=caption, name="image")

    def describe(self) -> dict[str, Any]:
        return {
            "type": "image_folder",
            "path": self.cfg.path,
            "index": self.cfg.index,
            "records": len(self.entries),
            "mode": self.mode,
        }


def _flatten(im: Image.Image, mode: str) -> Image.Image:
    """Any PIL image -> ``mode``, compositing transparency over white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        im = bg
    return im.convert(mode)
