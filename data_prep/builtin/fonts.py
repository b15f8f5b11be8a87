"""Font files as glyph sources: discovery, which code points a font really draws, master bitmaps.

A font "draws" a code point when its cmap maps it to a real glyph: not ``.notdef``, not a
fallback placeholder shared by many code points, not a glyph whose standard (AGL) name says it
is another character, and the rendered bitmap is neither empty nor the font's ``.notdef``. A font
where more than ``UNTRUSTED_SHARE`` of the cmap fails the first three checks is not a Unicode
font and draws nothing: LastResort maps all of Unicode to a few hundred placeholder boxes, the
TeX fonts map ASCII to arrows, delimiters and calligraphic capitals.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from fontTools import agl
from fontTools.ttLib import TTFont, TTLibError
from PIL import Image, ImageDraw, ImageFont

FONT_SUFFIXES = (".ttf", ".otf")
PLACEHOLDER_SHARE = 16  # a glyph reached from more code points than this is a fallback box
UNTRUSTED_SHARE = 0.05  # a font with more placeholder or misnamed entries is wholly distrusted
_NOTDEF_PROBE = 0x10FFFD  # a private-use code point real fonts leave unmapped


def default_font_dir() -> Path:
    """The fonts matplotlib ships (DejaVu, STIX, Computer Modern, LastResort)."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@dataclass(frozen=True)
class FontFile:
    """One font file and the code points it maps to usable glyphs (before rendering checks)."""

    path: str
    sha256: str
    mapped: frozenset[int]

    @property
    def name(self) -> str:
        return Path(self.path).name


def discover_fonts(font_dir: Path) -> list[FontFile]:
    """Every .ttf/.otf file in ``font_dir`` (sorted by name) with its usable cmap entries."""
    if not font_dir.is_dir():
        raise FileNotFoundError(f"font directory {font_dir} does not exist; expected a directory "
                                f"of {'/'.join(FONT_SUFFIXES)} files")
    paths = sorted(p for p in font_dir.iterdir() if p.suffix.lower() in FONT_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"font directory {font_dir} holds no {'/'.join(FONT_SUFFIXES)} "
                                "files")
    return [_read_font(p) for p in paths]


def _read_font(path: Path) -> FontFile:
    try:
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
    except (TTLibError, OSError, AssertionError) as err:
        raise ValueError(f"{path}: not a readable TrueType/OpenType font ({err})") from err
    shares = Counter(cmap.values())
    usable = {cp for cp, glyph in cmap.items()
              if glyph != ".notdef" and shares[glyph] <= PLACEHOLDER_SHARE}
    trusted = {cp for cp in usable if not _names_other_char(cmap[cp], cp)}
    if len(trusted) < (1 - UNTRUSTED_SHARE) * len(cmap):
        trusted = set()  # a fallback font or a private encoding, not a Unicode font
    return FontFile(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), frozenset(trusted))


def _names_other_char(glyph: str, cp: int) -> bool:
    """True when the glyph's standard (AGL) name decodes to a different character.

    Adobe's names for TeX delimiter pieces decode to private-use code points, so those count as
    other characters too; a name that decodes to nothing or to several characters says nothing.
    """
    named = agl.toUnicode(glyph)
    if len(named) != 1:
        return False
    return unicodedata.normalize("NFKC", named) != unicodedata.normalize("NFKC", chr(cp))


@lru_cache(maxsize=256)
def pil_font(path: str, px: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point, one glyph, the same with or without libraqm
    return ImageFont.truetype(path, px, layout_engine=ImageFont.Layout.BASIC)


def render_ink(path: str, char: str, px: int, stroke: int = 0) -> np.ndarray:
    """White-on-black float bitmap of ``char`` cropped to its ink; shape (0, 0) when blank."""
    font = pil_font(path, px)
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    pad = 2
    width, height = max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, font=font, fill=255,
                                stroke_width=stroke, stroke_fill=255)
    ink = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.flatnonzero(ink.max(1) > 0), np.flatnonzero(ink.max(0) > 0)
    if len(rows) == 0:
        return np.zeros((0, 0), np.float32)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _mask(path: str, char: str, px: int) -> tuple[tuple[int, int], bytes] | None:
    """FreeType's coverage mask of ``char`` (size, bytes); None when it has no ink."""
    mask = pil_font(path, px).getmask(char)
    if mask.getbbox() is None:
        return None
    return mask.size, Image.Image()._new(mask).tobytes()


@lru_cache(maxsize=64)
def _notdef(path: str, px: int) -> tuple[tuple[int, int], bytes] | None:
    return _mask(path, chr(_NOTDEF_PROBE), px)


def draws(font: FontFile, char: str, px: int = 24) -> bool:
    """Whether ``font`` really draws ``char``: mapped, and rendered neither blank nor .notdef."""
    if ord(char) not in font.mapped:
        return False
    mask = _mask(font.path, char, px)
    return mask is not None and mask != _notdef(font.path, px)


def fit_square(ink: np.ndarray, side: int) -> np.ndarray:
    """``ink`` scaled (aspect kept) so its longer side is ``side``, centred on a side² canvas."""
    height, width = ink.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray(np.uint8(ink * 255)).resize(size, Image.Resampling.BILINEAR)
    canvas = np.zeros((side, side), np.float32)
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    canvas[top:top + size[1], left:left + size[0]] = np.asarray(small, np.float32) / 255.0
    return canvas
