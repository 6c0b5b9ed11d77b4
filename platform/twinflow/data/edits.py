"""Exact, reproducible image edits with templated instructions: the true edited target is known.

Every edit is a deterministic integer operation on the stored pixels (a transpose, a filter, a roll,
an HSV hue rotation), so re-running the pipeline gives byte-identical pairs and a model's output can be
compared against the exact target. Which edits and which parameters a record gets depend only on
(seed, record id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from twinflow.data.captions import check_templates, stable_index, with_article
from twinflow.data.config import EditsConfig

DEFAULT_INSTRUCTIONS: dict[str, list[str]] = {
    "rotate": ["rotate the {name} {turn}", "turn the image {turn}", "rotate it {turn}"],
    "flip": ["flip the {name} {how}", "mirror the image {how}", "flip the picture {how}"],
    "invert": ["invert the colors of the {name}", "make a negative of the image", "invert the image"],
    "grayscale": ["make the {name} black and white", "convert the image to grayscale", "remove the colors"],
    "hue_shift": [
        "shift the hue by {degrees} degrees",
        "change the hue of the {name} by {degrees} degrees",
        "rotate the colors {degrees} degrees around the color wheel",
    ],
    "shift": ["move the {name} {pixels} pixels {direction}", "shift the image {pixels} pixels {direction}"],
    "thicker": [
        "make the strokes thicker",
        "draw the {name} with bolder lines",
        "thicken the lines of the {name}",
    ],
    "thinner": [
        "make the strokes thinner",
        "draw the {name} with finer lines",
        "thin the lines of the {name}",
    ],
}
OP_FIELDS: dict[str, set[str]] = {
    "rotate": {"turn", "degrees"},
    "flip": {"how", "axis"},
    "invert": set(),
    "grayscale": set(),
    "hue_shift": {"degrees"},
    "shift": {"pixels", "direction"},
    "thicker": set(),
    "thinner": set(),
}
RGB_ONLY = {"grayscale", "hue_shift"}
GRAY_ONLY = {"thicker", "thinner"}
TURNS = {90: "90 degrees clockwise", 180: "180 degrees", 270: "90 degrees counterclockwise"}
DIRECTIONS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


@dataclass(frozen=True)
class Edit:
    op: str
    params: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> str:
        return json.dumps({"op": self.op, **self.params}, sort_keys=True)


def background_value(arr: np.ndarray) -> np.ndarray:
    """The most common border pixel: what fills space uncovered by a shift, and the 'paper' colour."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).reshape(
        -1, arr.shape[2] if arr.ndim == 3 else 1
    )
    values, counts = np.unique(border, axis=0, return_counts=True)
    return values[np.argmax(counts)]


def ink(arr: np.ndarray, bg: np.ndarray) -> float:
    """Total distance from the background colour: how much is drawn."""
    a = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.int32)
    return float(np.abs(a - bg.reshape(1, 1, -1).astype(np.int32)).sum())


def apply_edit(im: Image.Image, edit: Edit, stroke_radius: int = 1) -> Image.Image:
    p = edit.params
    if edit.op == "rotate":
        return im.transpose(
            {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}[
                p["degrees"]
            ]
        )
    if edit.op == "flip":
        return im.transpose(
            Image.Transpose.FLIP_LEFT_RIGHT if p["axis"] == "horizontal" else Image.Transpose.FLIP_TOP_BOTTOM
        )
    if edit.op == "invert":
        return ImageOps.invert(im)
    if edit.op == "grayscale":
        return im.convert("L").convert(im.mode)
    if edit.op == "hue_shift":
        hsv = np.array(im.convert("HSV"))
        step = int(round(p["degrees"] % 360 * 256 / 360))
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + step) % 256
        return Image.fromarray(hsv, mode="HSV").convert(im.mode)
    if edit.op == "shift":
        arr = np.array(im)
        bg = background_value(arr)
        n = p["pixels"]
        out = np.empty_like(arr)
        out[...] = bg.reshape((1, 1, -1) if arr.ndim == 3 else ())
        if p["direction"] == "left":
            out[:, :-n] = arr[:, n:]
        elif p["direction"] == "right":
            out[:, n:] = arr[:, :-n]
        elif p["direction"] == "up":
            out[:-n] = arr[n:]
        else:
            out[n:] = arr[:-n]
        return Image.fromarray(out, mode=im.mode)
    if edit.op in ("thicker", "thinner"):
        # Ink is whatever differs from the background: bright strokes on dark paper grow with a max
        # filter, dark strokes on light paper with a min filter.
        bright_ink = int(background_value(np.array(im)).mean()) < 128
        grow = (edit.op == "thicker") == bright_ink
        size = 2 * stroke_radius + 1
        return im.filter(ImageFilter.MaxFilter(size) if grow else ImageFilter.MinFilter(size))
    raise ValueError(f"unknown edit op {edit.op!r}")


class EditMaker:
    """Chooses, applies and describes the edits of one record, deterministically from (seed, id)."""

    def __init__(self, cfg: EditsConfig, seed: int, mode: str) -> None:
        self.cfg, self.seed = cfg, seed
        bad = sorted(set(cfg.ops) & (GRAY_ONLY if mode == "RGB" else RGB_ONLY))
        if bad:
            need = "grayscale (L)" if mode == "RGB" else "RGB"
            raise ValueError(f"edits.ops {bad} need a {need} source, but this source is {mode}")
        self.templates = {op: cfg.instructions.get(op) or DEFAULT_INSTRUCTIONS[op] for op in cfg.ops}
        for op, templates in self.templates.items():
            check_templates(templates, OP_FIELDS[op] | {"name", "a_name"}, f"edits.instructions.{op}")

    def choose(self, rid: str, size: tuple[int, int]) -> list[Edit]:
        """All ops in a per-record order, each with its parameters (caller takes what applies)."""
        ops = list(self.cfg.ops)
        order = sorted(
            range(len(ops)), key=lambda i: stable_index(self.seed, f"{rid}/order/{ops[i]}", 1 << 30)
        )
        return [self._params(ops[i], rid, size) for i in order]

    def _params(self, op: str, rid: str, size: tuple[int, int]) -> Edit:
        pick = lambda seq, tag: seq[stable_index(self.seed, f"{rid}/{op}/{tag}", len(seq))]  # noqa: E731
        if op == "rotate":
            return Edit(op, {"degrees": int(pick(self.cfg.rotate_degrees, "deg"))})
        if op == "flip":
            return Edit(op, {"axis": pick(["horizontal", "vertical"], "axis")})
        if op == "hue_shift":
            return Edit(op, {"degrees": int(pick(self.cfg.hue_degrees, "deg"))})
        if op == "shift":
            pixels = max(1, int(round(self.cfg.shift_fraction * min(size))))
            return Edit(op, {"direction": pick(list(DIRECTIONS), "dir"), "pixels": pixels})
        return Edit(op)

    def make(self, rid: str, image: Image.Image) -> list[tuple[Edit, Image.Image]]:
        """Up to ``per_image`` (edit, target) pairs; an edit that would erase the drawing is skipped."""
        out: list[tuple[Edit, Image.Image]] = []
        for edit in self.choose(rid, image.size):
            target = apply_edit(image, edit, self.cfg.stroke_radius)
            if edit.op == "thinner":
                src = np.array(image)
                bg = background_value(src)
                if ink(np.array(target), bg) < self.cfg.min_ink_kept * ink(src, bg):
                    continue
            out.append((edit, target))
            if len(out) == self.cfg.per_image:
                break
        return out

    def instruction(self, rid: str, edit: Edit, name: str) -> str:
        templates: Sequence[str] = self.templates[edit.op]
        t = templates[stable_index(self.seed, f"{rid}/{edit.op}/text", len(templates))]
        p = edit.params
        fields: dict[str, Any] = {"name": name, "a_name": with_article(name), **p}
        if edit.op == "rotate":
            fields["turn"] = TURNS[p["degrees"]]
        elif edit.op == "flip":
            fields["how"] = "horizontally" if p["axis"] == "horizontal" else "vertically"
        elif edit.op == "shift":
            fields["direction"] = DIRECTIONS[p["direction"]]
        return t.format(**fields)
