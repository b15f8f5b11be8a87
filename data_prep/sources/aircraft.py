"""FGVC-Aircraft (Meta-Dataset source ``aircraft``): 100 variants, each image cropped to its box.

Class = variant, split by Meta-Dataset's split list. Each line of images_variant_*.txt is split on
the first space only: variant names contain spaces ("Cessna 172", "BAE 146-200").

Boxes: images_box.txt gives 1-based inclusive pixel coordinates (xmin ymin xmax ymax).
Meta-Dataset passes the four numbers unchanged to PIL's ``crop``, whose box is 0-based with an
exclusive right/bottom edge; its crops therefore start one pixel inside the annotated box's top
and left edges and end at its last pixel. We reproduce that convention exactly so that every
crop covers the same pixels as Meta-Dataset's; boxes beyond the image are clipped to it.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import require
from data_prep.sources.metadataset_common import (
    find_root,
    load_rgb_crop,
    split_list_classes,
    write_metadataset,
)

SOURCE = "aircraft"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
fgvc-aircraft-2013b/                  <- --raw (fgvc-aircraft-2013b.tar.gz, unpacked)
  data/variants.txt                   100 variant names
  data/images_variant_trainval.txt    "<image id> <variant>" per line
  data/images_variant_test.txt        "<image id> <variant>" per line
  data/images_box.txt                 "<image id> <xmin> <ymin> <xmax> <ymax>" (1-based)
  data/images/<image id>.jpg          10,000 images"""


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    data = find_root(raw, SOURCE, LAYOUT, "data/images_box.txt", ("fgvc-aircraft-2013b",)) / "data"
    variants = _variants(require(data / "variants.txt", SOURCE, LAYOUT))
    image_variant = {}
    for name in ("images_variant_trainval.txt", "images_variant_test.txt"):
        image_variant.update(_image_variants(require(data / name, SOURCE, LAYOUT), variants))
    boxes = _boxes(data / "images_box.txt")
    found: dict[str, list] = {v: [] for v in variants}
    for image_id in sorted(image_variant):
        if image_id not in boxes:
            raise ValueError(f"{data / 'images_box.txt'}: no box for image {image_id!r}")
        found[image_variant[image_id]].append((str(data / "images" / f"{image_id}.jpg"),
                                               boxes[image_id]))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_rgb_crop, split_source="Meta-Dataset splits/aircraft_splits.json",
        workers=workers, settings=settings,
        extra={"crop": "images_box.txt numbers passed to PIL crop as-is, like Meta-Dataset"})


def _lines(path: Path) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def _variants(path: Path) -> list[str]:
    return [line.strip() for _, line in _lines(path)]


def _image_variants(path: Path, variants: list[str]) -> dict[str, str]:
    """Image id -> variant; the variant is everything after the first space."""
    known = set(variants)
    pairs = {}
    for n, line in _lines(path):
        image_id, _, variant = line.partition(" ")
        if variant not in known:
            raise ValueError(f"{path}:{n}: variant {variant!r} is not listed in variants.txt")
        pairs[image_id] = variant
    return pairs


def _boxes(path: Path) -> dict[str, tuple[int, int, int, int]]:
    boxes = {}
    for n, line in _lines(path):
        try:
            image_id, *coords = line.split()
            box = tuple(int(v) for v in coords)
        except ValueError:
            box = ()
        if len(box) != 4:
            raise ValueError(f"{path}:{n}: expected '<image id> <xmin> <ymin> <xmax> <ymax>' "
                             f"with integer coordinates, got {line!r}")
        boxes[image_id] = box
    return boxes
