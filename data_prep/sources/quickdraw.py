"""Quick, Draw! (Meta-Dataset source ``quickdraw``): 345 classes, 50.4 M doodles, 28x28 grey.

Class = file stem of ``<class name>.npy`` (names contain spaces: "police car"), split by
Meta-Dataset's split list; each file is an [N, 784] uint8 array, row i is image i (28x28,
stored greyscale at its native 28 px as lossless PNG).

Throughput: a class is never loaded whole. Its items are (file, row) pairs produced lazily by
``NpyRows``; each worker opens every file once as a read-only memory map (cached), so an image
costs one 784-byte read plus a PNG encode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.convert import ConversionReport, StorageSettings, merged, warning
from data_prep.sources.metadataset_common import (
    find_root,
    split_list_classes,
    write_metadataset,
)

SOURCE = "quickdraw"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
quickdraw/                      <- --raw, or its parent (gs://quickdraw_dataset/full/numpy_bitmap/*.npy)
  <class name>.npy              345 files, each an [N, 784] uint8 array of 28x28 images"""
SIDE = 28



class NpyRows(Sequence):
    """The items of one class, ``(path, row)`` for each row, without building them up front."""

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows = path, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> tuple[str, int]:
        if not -self.rows <= index < self.rows:
            raise IndexError(index)
        return self.path, index % self.rows

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((self.path, row) for row in range(self.rows))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "*.npy", ("quickdraw",))
    files = sorted(root.glob("*.npy"))
    others = sorted(p.name for p in root.iterdir() if p.suffix != ".npy")
    extra = {"ignored_entries": len(others)}
    if others:
        extra = merged(extra, warning(SOURCE, f"ignoring {len(others)} entries of {root} that "
                                              f"are not .npy files: {others[:10]}"))
    found = {path.stem: NpyRows(str(path), _num_rows(path)) for path in files}
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_row, split_source="Meta-Dataset splits/quickdraw_splits.json",
        workers=workers, settings=settings, extra=extra)


def _num_rows(path: Path) -> int:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable .npy file: {err}") from err
    if array.ndim != 2 or array.shape[1] != SIDE * SIDE or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an [N, {SIDE * SIDE}] uint8 array, found "
                         f"{list(array.shape)} {array.dtype}")
    return array.shape[0]


@lru_cache(maxsize=8)
def _rows(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def load_row(item: tuple[str, int]) -> Image.Image:
    """Row ``item[1]`` of ``item[0]`` as a 28x28 greyscale image."""
    path, row = item
    return Image.fromarray(np.array(_rows(path)[row]).reshape(SIDE, SIDE))
