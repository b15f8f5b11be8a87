"""The Omniglot-like meta-training domain: characters of many scripts rendered from fonts.

Class = one Unicode character, superclass = its script. Like Omniglot, whole scripts go to one
split; the fixed assignment (``SCRIPTS``) gives train the Latin-family, Greek, Cyrillic, Hebrew,
Arabic, Lao, Ogham, Lisu and symbol scripts, valid N'Ko and Canadian syllabics, and test
Armenian, Georgian and Tifinagh.

A character becomes a class when at least ``min_fonts`` fonts really draw it (see fonts.py), it
is a letter, digit or symbol without a diacritic decomposition, and its shape is not a duplicate
of a class already kept (Latin A, Greek Alpha and Cyrillic A are one shape: the first script in
``SCRIPTS`` keeps it), nor a solid shape that would render as a blob. Scripts with many
characters are thinned evenly to ``max_classes_per_script``. ``convert`` records the script ->
split assignment, the settings, the font files' SHA-256 and every dropped character.

Instance j of the character with code point p is drawn from a Generator seeded with
SeedSequence([seed, p, j]): a random font, stroke width, affine map and smooth elastic
displacement, white on black. The bytes depend only on the settings, the font files and the
FreeType/scipy versions, never on the worker count or on which other scripts are rendered.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from data_prep.builtin.fonts import (
    FontFile,
    default_font_dir,
    discover_fonts,
    draws,
    fit_square,
    render_ink,
)
from data_prep.convert import ClassSpec, ConversionReport, StorageSettings, write_domain

log = logging.getLogger(__name__)

VERSION = "1"
LAYOUT = ("optional: a directory of .ttf/.otf font files (default: the fonts matplotlib ships "
          "in mpl-data/fonts/ttf)")
NEEDS_RAW = False

_CATEGORIES = {"Lu", "Ll", "Lt", "Lo", "Nd", "Nl", "Sm", "So"}
_SIGNATURE_PX = 32  # shapes are compared as binary bitmaps of this size


@dataclass(frozen=True)
class Script:
    """A superclass: a named set of inclusive code point ranges assigned wholly to one split."""

    name: str
    split: str
    ranges: tuple[tuple[int, int], ...]


SCRIPTS: tuple[Script, ...] = (
    Script("Latin", "train", ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F))),
    Script("Greek", "train", ((0x370, 0x3FF),)),
    Script("Cyrillic", "train", ((0x400, 0x52F),)),
    Script("IPA", "train", ((0x250, 0x2AF),)),
    Script("Hebrew", "train", ((0x5D0, 0x5F2),)),
    Script("Arabic", "train", ((0x620, 0x64A), (0x66E, 0x6D3))),
    Script("Lao", "train", ((0xE80, 0xEFF),)),
    Script("Ogham", "train", ((0x1680, 0x169F),)),
    Script("Lisu", "train", ((0xA4D0, 0xA4FF),)),
    Script("Fraktur", "train", ((0x1D504, 0x1D537), (0x1D56C, 0x1D59F))),
    Script("Math script", "train", ((0x1D49C, 0x1D503),)),
    Script("Double-struck", "train", ((0x1D538, 0x1D56B),)),
    Script("Arrows", "train", ((0x2190, 0x21FF), (0x27F0, 0x27FF), (0x2900, 0x297F))),
    Script("Math operators", "train", ((0x2200, 0x22FF), (0x2A00, 0x2AFF))),
    Script("Technical", "train", ((0x2300, 0x23FF),)),
    Script("Geometric shapes", "train", ((0x25A0, 0x25FF), (0x2B00, 0x2BFF))),
    Script("Dingbats", "train", ((0x2600, 0x26FF), (0x2700, 0x27BF))),
    Script("N'Ko", "valid", ((0x7C0, 0x7FF),)),
    Script("Canadian syllabics", "valid", ((0x1400, 0x167F),)),
    Script("Armenian", "test", ((0x531, 0x556), (0x561, 0x587))),
    Script("Georgian", "test", ((0x10A0, 0x10FF), (0x2D00, 0x2D2F))),
    Script("Tifinagh", "test", ((0x2D30, 0x2D7F),)),
)


@dataclass(frozen=True)
class GlyphSettings:
    """What is rendered and how; stored in the domain file's settings."""

    instances: int = 20  # images per class
    size: int = 64  # square canvas side in pixels
    seed: int = 0
    scripts: tuple[str, ...] | None = None  # a subset of SCRIPTS names; None = all
    max_classes_per_script: int = 60
    min_fonts: int = 2  # fonts that must draw a character for it to become a class
    duplicate_iou: float = 0.9  # shapes this similar to a kept class are dropped
    max_fill: float = 0.6  # solid shapes inking more of their square than this render as blobs
    scale: tuple[float, float] = (0.55, 0.8)  # longer glyph side as a fraction of the canvas
    aspect_jitter: float = 0.15  # log-scale range of independent x/y stretch
    rotation_deg: float = 12.0
    shear: float = 0.25
    translate: float = 0.06  # fraction of the canvas
    max_stroke: int = 1  # extra outline in pixels at font size = canvas size
    elastic_px: float = 2.0  # RMS displacement of the elastic field
    elastic_sigma: float = 8.0  # smoothness of the elastic field in pixels

    def __post_init__(self) -> None:
        for name in ("instances", "size", "max_classes_per_script", "min_fonts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"glyphs option {name}={value!r}: expected a positive integer")
        if isinstance(self.scripts, str) or \
                not all(isinstance(name, str) for name in self.scripts or ()):
            raise ValueError(f"glyphs option scripts={self.scripts!r}: expected a list of script "
                             "names")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"glyphs option scale={self.scale!r}: expected 0 < low <= high <= 1")

    @classmethod
    def from_options(cls, options: dict) -> GlyphSettings:
        """Settings from converter options (``--option instances=5``); YAML lists become tuples."""
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"glyphs: unknown options {unknown}; known options: {known}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


@dataclass(frozen=True)
class GlyphClass:
    """One class: a character, its script and the fonts (indices) that draw it."""

    char: str
    script: Script
    font_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return unicodedata.name(self.char, f"U+{ord(self.char):04X}")


def chosen_scripts(settings: GlyphSettings) -> list[Script]:
    """The scripts to render, in SCRIPTS order; unknown names are an error listing the known."""
    if settings.scripts is None:
        return list(SCRIPTS)
    known = {s.name for s in SCRIPTS}
    unknown = sorted(set(settings.scripts) - known)
    if unknown:
        raise ValueError(f"glyph scripts {unknown} are unknown; known: {sorted(known)}")
    return [s for s in SCRIPTS if s.name in settings.scripts]


def candidate_chars(script: Script) -> list[str]:
    """Letters, digits and symbols of ``script`` that are not a base plus diacritics."""
    chars = []
    for low, high in script.ranges:
        for cp in range(low, high + 1):
            char = chr(cp)
            decomposition = unicodedata.decomposition(char)
            if unicodedata.category(char) in _CATEGORIES and \
                    (not decomposition or decomposition.startswith("<font>")):
                chars.append(char)
    return chars


def _signature(font: FontFile, char: str) -> np.ndarray:
    """The glyph's shape normalised to a square, binarised and packed into uint64 words."""
    ink = render_ink(font.path, char, 2 * _SIGNATURE_PX)
    binary = fit_square(ink, _SIGNATURE_PX).ravel() > 0.5
    return np.packbits(binary).view(np.uint64)


class _ShapeIndex:
    """Binary shapes of the kept classes, bit-packed; finds the kept class a shape duplicates."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.chars: list[str] = []
        self.bits = np.zeros((64, _SIGNATURE_PX * _SIGNATURE_PX // 64), np.uint64)
        self.areas = np.zeros(64, np.int64)

    def duplicate_of(self, bits: np.ndarray) -> str | None:
        n = len(self.chars)
        if n == 0:
            return None
        inter = np.bitwise_count(self.bits[:n] & bits).sum(1, dtype=np.int64)
        union = self.areas[:n] + int(np.bitwise_count(bits).sum()) - inter
        iou = inter / np.maximum(union, 1)
        best = int(iou.argmax())
        return self.chars[best] if iou[best] >= self.threshold else None

    def add(self, char: str, bits: np.ndarray) -> None:
        n = len(self.chars)
        if n == len(self.bits):
            self.bits = np.concatenate([self.bits, np.zeros_like(self.bits)])
            self.areas = np.concatenate([self.areas, np.zeros_like(self.areas)])
        self.bits[n] = bits
        self.areas[n] = np.bitwise_count(bits).sum()
        self.chars.append(char)


def _drawn_by(fonts: list[FontFile], char: str) -> tuple[int, ...]:
    return tuple(i for i, font in enumerate(fonts) if draws(font, char))


def select_classes(fonts: list[FontFile], settings: GlyphSettings
                   ) -> tuple[list[GlyphClass], dict]:
    """The classes of the domain (SCRIPTS order, then code point order) and what was dropped."""
    index = _ShapeIndex(settings.duplicate_iou)
    classes: list[GlyphClass] = []
    dropped: dict = {"duplicates": {}, "few_fonts": {}, "solid": {}, "thinned": {}}
    for script in chosen_scripts(settings):
        kept: list[tuple[GlyphClass, np.ndarray]] = []
        local = _ShapeIndex(settings.duplicate_iou)
        few = solid = 0
        for char in candidate_chars(script):
            font_ids = _drawn_by(fonts, char)
            if len(font_ids) < settings.min_fonts:
                few += 1
                continue
            # one reference font (the widest coverage) draws the shape, so cross-script twins
            # are compared in the same design whenever it has both
            reference = max(font_ids, key=lambda i: (len(fonts[i].mapped), -i))
            shape = _signature(fonts[reference], char)
            if np.bitwise_count(shape).sum() > settings.max_fill * _SIGNATURE_PX ** 2:
                solid += 1
                continue
            twin = index.duplicate_of(shape) or local.duplicate_of(shape)
            if twin is not None:
                dropped["duplicates"][f"U+{ord(char):04X}"] = f"U+{ord(twin):04X}"
                continue
            local.add(char, shape)
            kept.append((GlyphClass(char, script, font_ids), shape))
        chosen = _thin(kept, settings.max_classes_per_script)
        for glyph_class, shape in chosen:
            index.add(glyph_class.char, shape)
            classes.append(glyph_class)
        dropped["few_fonts"][script.name] = few
        dropped["solid"][script.name] = solid
        dropped["thinned"][script.name] = len(kept) - len(chosen)
    return classes, dropped


def _thin(kept: list, limit: int) -> list:
    """At most ``limit`` entries, spread evenly over the code point order."""
    if len(kept) <= limit:
        return kept
    picks = np.unique(np.linspace(0, len(kept) - 1, limit).round().astype(int))
    return [kept[i] for i in picks]


def _affine(rng: np.random.Generator, ink_shape: tuple[int, int], s: GlyphSettings
            ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse map (matrix, offset) from output (row, col) to ink (row, col) coordinates."""
    longer = rng.uniform(*s.scale) * s.size / max(ink_shape)
    stretch = np.exp(rng.uniform(-s.aspect_jitter, s.aspect_jitter, size=2))
    angle = np.deg2rad(rng.uniform(-s.rotation_deg, s.rotation_deg))
    cos, sin = np.cos(angle), np.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    shear = np.array([[1.0, 0.0], [rng.uniform(-s.shear, s.shear), 1.0]])
    forward = rotate @ shear @ np.diag(longer * stretch)
    inverse = np.linalg.inv(forward)
    shift = rng.uniform(-s.translate, s.translate, size=2) * s.size
    out_centre = np.full(2, (s.size - 1) / 2) + shift
    ink_centre = (np.array(ink_shape) - 1) / 2
    return inverse, ink_centre - inverse @ out_centre


def _elastic(rng: np.random.Generator, s: GlyphSettings) -> np.ndarray:
    """A smooth random displacement field (2, size, size) with RMS ``elastic_px``."""
    field = gaussian_filter(rng.standard_normal((2, s.size, s.size)),
                            sigma=(0, s.elastic_sigma, s.elastic_sigma), mode="wrap")
    return field * (s.elastic_px / max(float(field.std()), 1e-12))


def render_instance(item: tuple[int, int, tuple[int, ...]], *, fonts: tuple[str, ...],
                    settings: GlyphSettings) -> np.ndarray:
    """Instance ``j`` of code point ``cp`` drawn with one of ``font_ids``: (size, size) uint8."""
    cp, j, font_ids = item
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, cp, j]))
    font = fonts[font_ids[rng.integers(len(font_ids))]]
    stroke = int(rng.integers(settings.max_stroke + 1))
    ink = render_ink(font, chr(cp), settings.size, stroke)
    matrix, offset = _affine(rng, ink.shape, settings)
    grid = np.indices((settings.size, settings.size), dtype=np.float64)
    grid += _elastic(rng, settings)
    coords = np.tensordot(matrix, grid, axes=1) + offset[:, None, None]
    image = map_coordinates(ink, coords, order=1, mode="constant", cval=0.0)
    return np.uint8(np.clip(image, 0.0, 1.0) * 255 + 0.5)


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None, **options) -> ConversionReport:
    """Render the glyph domain from the fonts in ``raw`` (default: matplotlib's) into ``out``.

    ``options`` are GlyphSettings fields, e.g. ``instances=5``.
    """
    glyph_settings = GlyphSettings.from_options(options)
    font_dir = Path(raw) if raw is not None else default_font_dir()
    fonts = discover_fonts(font_dir)
    classes, dropped = select_classes(fonts, glyph_settings)
    if not classes:
        scripts = [s.name for s in chosen_scripts(glyph_settings)]
        raise ValueError(f"glyphs: no character of scripts {scripts} is drawn by "
                         f"{glyph_settings.min_fonts} or more of the fonts in {font_dir}")
    specs = [ClassSpec(c.name, c.script.split, [(ord(c.char), j, c.font_ids)
                                                for j in range(glyph_settings.instances)],
                       superclass=c.script.name) for c in classes]
    load = partial(render_instance, fonts=tuple(f.path for f in fonts), settings=glyph_settings)
    extra = {"glyphs": asdict(glyph_settings),
             "script_split": {s.name: s.split for s in chosen_scripts(glyph_settings)},
             "fonts": {f.name: f.sha256 for f in fonts}, "dropped": dropped}
    log.info("glyphs: %d classes from %d fonts", len(classes), len(fonts))
    return write_domain(out, source="glyphs", converter_version=VERSION, classes=specs,
                        load=load, settings=settings or StorageSettings(short_side=None),
                        extra_settings=extra, workers=workers)
