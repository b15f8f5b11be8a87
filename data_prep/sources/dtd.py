"""Describable Textures (Meta-Dataset source ``dtd``): 47 textures, one folder per class.

Class = folder name, split by Meta-Dataset's split list; files in sorted name order. The
download's ``images/waffled/.directory`` (a KDE folder-settings file) is left out, as
Meta-Dataset does; any other non-image file would be reported as unreadable.
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

SOURCE = "dtd"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
dtd/                             <- --raw (dtd-r1.0.1.tar.gz, unpacked)
  images/<texture>/*.jpg         47 folders, 5,640 images (waffled/ also holds .directory)"""
STRAY_FILES = (".directory",)


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    images = find_root(raw, SOURCE, LAYOUT, "images", ("dtd",)) / "images"
    classes = split_list_classes(SOURCE, LAYOUT, folder_classes(images, STRAY_FILES))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=classes, load=load_rgb,
        split_source="Meta-Dataset splits/dtd_splits.json", workers=workers, settings=settings,
        extra={"excluded_files": list(STRAY_FILES)})
