"""CUB-200-2011 (Meta-Dataset source ``cu_birds``): 200 bird species, one folder per class.

Class = folder name ("001.Black_footed_Albatross"), split by Meta-Dataset's split list; files in
sorted name order. classes.txt is not needed: the split list names every class.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.metadataset_common import (
    find_root,
    folder_classes,
    load_rgb,
    split_list_classes,
    write_metadataset,
)

SOURCE = "cu_birds"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
CUB_200_2011/                          <- --raw (CUB_200_2011.tgz, unpacked)
  images/<NNN.Species_name>/*.jpg      200 folders, 11,788 images"""


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    images = find_root(raw, SOURCE, LAYOUT, "images", ("CUB_200_2011",)) / "images"
    classes = split_list_classes(SOURCE, LAYOUT, folder_classes(images))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=classes, load=load_rgb,
        split_source="Meta-Dataset splits/cu_birds_splits.json", workers=workers,
        settings=settings)
