"""EuroSAT RGB (BSCD-FSL target): 64x64 Sentinel-2 RGB chips, one folder per class.

Every class is a test class; labels are the sorted folder names. The images are stored at their
native 64x64 (smaller than any storage short side, so never resized).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.cross_domain_common import Expected, bscd_protocol, convert_class_folders

VERSION = "1"
NEEDS_RAW = True
SUBDIR = "2750"
LAYOUT = "<raw>/2750/<10 class folders: AnnualCrop, Forest, ..., SeaLake>/*.jpg (64x64 RGB)"
EXPECTED = Expected(classes=10, images=27_000, splits=(0, 0, 10))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    return convert_class_folders(raw, out, source="eurosat", version=VERSION, layout=LAYOUT,
                                 subdirs=(SUBDIR,), expected=EXPECTED, protocol=bscd_protocol,
                                 workers=workers, settings=settings)
