"""ISIC 2018 task 3 training set (HAM10000; BSCD-FSL target): 7 lesion classes, all test.

The label of an image is the column holding the single 1 of its one-hot row in the ground-truth
CSV; class names are the 7 column headers after ``image``, in column order (MEL, NV, BCC, AKIEC,
BKL, DF, VASC). A row that is not exactly one-hot is an error (IBM/cdfsl-benchmark's argmax would
silently take the first 1). A row whose image is not on disk is still listed, so the conversion
engine counts and reports it as unreadable (and fails past ``max_bad_fraction``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings, merged, write_domain
from data_prep.sources.common import load_image, require, require_raw
from data_prep.sources.cross_domain_common import (
    Expected,
    bscd_protocol,
    check_expected,
    first_existing,
)

VERSION = "1"
NEEDS_RAW = True
INPUT_DIR = "ISIC2018_Task3_Training_Input"
CSV_NAME = "ISIC2018_Task3_Training_GroundTruth.csv"
# the official GroundTruth zip unpacks into a folder of the same name; a loose CSV works too
CSV_CANDIDATES = (CSV_NAME, f"ISIC2018_Task3_Training_GroundTruth/{CSV_NAME}")
LAYOUT = (f"<raw>/{INPUT_DIR}/<image id>.jpg\n"
          f"<raw>/{CSV_NAME} (or <raw>/ISIC2018_Task3_Training_GroundTruth/{CSV_NAME}):\n"
          "    header 'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC', one one-hot row per image")
NUM_LABELS = 7
CSV_ROWS = 10_015
EXPECTED = Expected(classes=7, images=10_015, splits=(0, 0, 7))


def _one_hot_label(path: Path, line: int, row: list[str], names: list[str]) -> int:
    try:
        values = [float(v) for v in row[1:]]
    except ValueError as err:
        raise ValueError(f"{path}:{line} (image {row[0]}): label values must be numbers: "
                         f"{row[1:]}") from err
    if len(values) != len(names) or sorted(values) != [0.0] * (len(names) - 1) + [1.0]:
        raise ValueError(f"{path}:{line} (image {row[0]}): expected exactly one 1 and otherwise 0 "
                         f"in the columns {names}, got {row[1:]}")
    return values.index(1.0)


def read_ground_truth(path: Path) -> tuple[list[str], dict[str, int]]:
    """Class names (CSV column order) and image id -> class index."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][:1] != ["image"] or len(rows[0]) != NUM_LABELS + 1:
        header = rows[0] if rows else []
        raise ValueError(f"{path}: header {header}: expected 'image' followed by {NUM_LABELS} "
                         "one-hot label columns")
    names = [name.strip() for name in rows[0][1:]]
    labels: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if row[0] in labels:
            raise ValueError(f"{path}:{line}: image {row[0]!r} is listed twice")
        labels[row[0]] = _one_hot_label(path, line, row, names)
    return names, labels


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = require_raw(raw, "isic", LAYOUT)
    images = require(root / INPUT_DIR, "isic", LAYOUT)
    names, labels = read_ground_truth(first_existing(root, CSV_CANDIDATES, "isic", LAYOUT))
    named = [(name, [images / f"{image}.jpg" for image in sorted(labels) if labels[image] == c])
             for c, name in enumerate(names)]
    classes, extra = bscd_protocol(named)
    extra = merged(extra, check_expected("isic", classes, EXPECTED, full=len(labels) >= CSV_ROWS))
    return write_domain(out, source="isic", converter_version=VERSION, classes=classes,
                        load=load_image, settings=settings, extra_settings=extra, workers=workers)
