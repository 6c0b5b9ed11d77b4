"""Single-code-point emoji rendered from Noto Color Emoji, captioned with their Unicode names."""

from __future__ import annotations

import glob
import shutil
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

from twinflow.data.captions import check_templates, fill
from twinflow.data.config import EmojiSource as EmojiConfig
from twinflow.data.sources.base import Source, SourceItem

FONT_NAME = "NotoColorEmoji.ttf"
BITMAP_SIZE = 109  # the one size the CBDT bitmap strikes exist at
# Categories of pictographs; leaves out format characters (ZWJ, variation selectors, tags),
# skin-tone modifiers (Sk), the combining keycap (Me), private use and unassigned code points.
KEEP_CATEGORIES = {"So", "Sm", "Po", "Pd", "Ll"}
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


def find_font(explicit: str | None = None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"emoji font {path} not found")
        return path
    hits = sorted(glob.glob(f"/usr/share/fonts/**/{FONT_NAME}", recursive=True))
    if not hits and shutil.which("fc-list"):
        out = subprocess.run(["fc-list", ":family=Noto Color Emoji", "file"], capture_output=True, text=True)
        hits = [line.split(":")[0] for line in out.stdout.splitlines() if line.strip()]
    if not hits:
        raise FileNotFoundError(
            f"{FONT_NAME} not found under /usr/share/fonts; run scripts/setup.sh "
            "(apt package fonts-noto-color-emoji)"
        )
    return Path(hits[0])


def emoji_code_points(font_path: Path) -> list[int]:
    """Code points the font maps to a glyph that stand alone as a named pictograph."""
    cmap = TTFont(str(font_path), lazy=True).getBestCmap()
    keep = []
    for cp in sorted(cmap):
        ch = chr(cp)
        if cp < 0x80 or cp in REGIONAL_INDICATORS:
            continue
        if unicodedata.category(ch) in KEEP_CATEGORIES and unicodedata.name(ch, ""):
            keep.append(cp)
    return keep


class Emoji(Source):
    mode = "RGB"

    def __init__(self, cfg: EmojiConfig, seed: int) -> None:
        check_templates(cfg.captions, {"name", "a_name"}, "source.captions")
        self.cfg, self.seed = cfg, seed
        self.font_path = find_font(cfg.font)
        self.code_points = emoji_code_points(self.font_path)
        if not self.code_points:
            raise ValueError(f"{self.font_path}: no emoji code points found in the font's cmap")
        self._font = ImageFont.truetype(str(self.font_path), BITMAP_SIZE)

    def splits(self) -> dict[str, int]:
        return {"all": len(self.code_points)}

    def render(self, cp: int) -> Image.Image:
        ch = chr(cp)
        left, top, right, bottom = self._font.getbbox(ch)
        glyph = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((0, 0), ch, font=self._font, embedded_color=True)
        box = glyph.getbbox() or (0, 0, right, bottom)
        glyph = glyph.crop(box)
        side = max(glyph.size)
        canvas_side = int(round(side / (1 - 2 * self.cfg.padding)))
        canvas = Image.new("RGBA", (canvas_side, canvas_side), (*self.cfg.background, 255))
        offset = ((canvas_side - glyph.width) // 2, (canvas_side - glyph.height) // 2)
        canvas.alpha_composite(glyph, offset)
        return canvas.convert("RGB")

    def item(self, split: str, index: int) -> SourceItem:
        cp = self.code_points[index]
        name = unicodedata.name(chr(cp)).lower()
        rid = f"emoji-{cp:05x}"
        caption = fill(self.cfg.captions, self.seed, rid, name=name)
        return SourceItem(id=rid, image=self.render(cp), caption=caption, label=cp, name=name)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "emoji",
            "name": "Noto Color Emoji",
            "font": str(self.font_path),
            "license": "OFL-1.1 (Google Noto fonts)",
            "code_points": len(self.code_points),
            "unicode_version": unicodedata.unidata_version,
            "caption_templates": list(self.cfg.captions),
            "mode": self.mode,
            "label": "Unicode code point",
        }
