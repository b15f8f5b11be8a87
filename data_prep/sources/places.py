"""Places365-Standard in the fine-grained benchmark of Tseng et al. 2020.

Classes are the sorted folders of the "easy format" train split; each keeps its first 200 files
by sorted name (Tseng's write_places_filelist.py); class index i goes to train (even i), valid
(i % 4 == 1) or test (i % 4 == 3) -> 183/91/91 classes.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.cross_domain_common import Expected, convert_class_folders, tseng_protocol

VERSION = "1"
NEEDS_RAW = True
SUBDIR = "places365_standard/train"
LAYOUT = "<raw>/places365_standard/train/<365 class folders, e.g. airfield>/*.jpg"
PER_CLASS = 200  # every Places365-Standard train class has at least 3,068 images
EXPECTED = Expected(classes=365, images=365 * PER_CLASS, splits=(183, 91, 91))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    return convert_class_folders(raw, out, source="places", version=VERSION, layout=LAYOUT,
                                 subdirs=(SUBDIR,), expected=EXPECTED, protocol=tseng_protocol,
                                 per_class=PER_CLASS, workers=workers, settings=settings)
