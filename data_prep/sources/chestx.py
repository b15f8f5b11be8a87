"""ChestX-ray8 (NIH chest X-rays, Kaggle copy; BSCD-FSL target): 7 thorax diseases, all test.

Following IBM/cdfsl-benchmark, only rows of ``Data_Entry_2017.csv`` (or the NIH's re-issue
``Data_Entry_2017_v2020.csv``, same images and labels) with a single finding among the 7 labels
below are used. Rows are dropped by that protocol, not silently: 'No Finding',
multi-label rows and every other single label (Pneumonia, and the labels ChestX-ray14 added) are
counted per reason in the provenance (``dropped_by_protocol``).

The Kaggle copy spreads the PNGs over ``images_001/images`` ... ``images_012/images``, so images
are found wherever they are under the raw root (one walk, indexed by file name; the same name in
two places is an error). A listed image that is not on disk is kept as a ``Missing`` item, which
fails to load, so the conversion engine counts and reports it (and fails past
``max_bad_fraction``). Images are stored greyscale: a few PNGs are RGBA copies of grey pixels.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_prep.convert import ConversionReport, StorageSettings, merged, write_domain
from data_prep.sources.common import IMAGE_SUFFIXES, LayoutError, load_image, require_raw
from data_prep.sources.cross_domain_common import (
    Expected,
    bscd_protocol,
    check_expected,
    first_existing,
)

VERSION = "1"
NEEDS_RAW = True
CSV_NAME = "Data_Entry_2017.csv"
CSV_CANDIDATES = (CSV_NAME, "Data_Entry_2017_v2020.csv")  # the first one present is read
LAYOUT = (f"<raw>/{CSV_NAME} or <raw>/{CSV_CANDIDATES[1]} (columns 'Image Index', "
          "'Finding Labels', ...)\n"
          "<raw>/**/<Image Index>.png anywhere below the root, e.g. the Kaggle copy's "
          "images_001/images/ ... images_012/images/")
LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
          "Pneumothorax")
CSV_ROWS = 112_120
EXPECTED = Expected(classes=7, images=25_848, splits=(0, 0, 7))
_COLUMNS = ("Image Index", "Finding Labels")


@dataclass(frozen=True)
class Missing:
    """An image listed in the CSV but found nowhere under the raw root."""

    name: str
    csv: str = field(default=CSV_NAME, repr=False)


def load_xray(item: Path | Missing) -> Image.Image:
    if isinstance(item, Missing):
        raise FileNotFoundError(f"listed in {item.csv} but not found under the raw root")
    return load_image(item).convert("L")


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path of every image file below ``root``; a repeated name is an error."""
    index: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(folder) / name
            if name in index:
                raise LayoutError(f"chestx: image name {name!r} occurs twice under {root}: "
                                  f"{index[name]} and {path}; keep one copy of the download")
            index[name] = path
    return index


def read_entries(path: Path) -> dict[str, str]:
    """Image Index -> Finding Labels of every row."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; header is {reader.fieldnames}")
        entries: dict[str, str] = {}
        for row in reader:
            name = row["Image Index"]
            if name in entries:
                raise ValueError(f"{path}:{reader.line_num}: image {name!r} is listed twice")
            entries[name] = row["Finding Labels"]
    return entries


def select_single_labels(entries: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Image names per used label (sorted), and rows dropped by the protocol, per reason."""
    kept: dict[str, list[str]] = {label: [] for label in LABELS}
    dropped: Counter[str] = Counter()
    for name in sorted(entries):
        findings = entries[name].split("|")
        if len(findings) > 1:
            dropped["multi-label"] += 1
        elif findings[0] in kept:
            kept[findings[0]].append(name)
        else:
            dropped[findings[0]] += 1
    return kept, dict(sorted(dropped.items()))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = require_raw(raw, "chestx", LAYOUT)
    csv_path = first_existing(root, CSV_CANDIDATES, "chestx", LAYOUT)
    entries = read_entries(csv_path)
    kept, dropped = select_single_labels(entries)
    index = index_images(root)
    named = [(label, [index.get(name, Missing(name, csv_path.name)) for name in names])
             for label, names in kept.items()]
    classes, extra = bscd_protocol(named)
    extra = merged(extra, check_expected("chestx", classes, EXPECTED,
                                         full=len(entries) >= CSV_ROWS),
                   {"csv_file": csv_path.name, "csv_rows": len(entries),
                    "dropped_by_protocol": dropped})
    return write_domain(out, source="chestx", converter_version=VERSION, classes=classes,
                        load=load_xray, settings=settings, extra_settings=extra, workers=workers)
