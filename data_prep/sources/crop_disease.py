"""CropDisease (Plant Village; BSCD-FSL target): the Kaggle copy's train split, a folder a class.

Every class is a test class; labels are the sorted folder names (as torchvision's ImageFolder in
IBM/cdfsl-benchmark). The Kaggle copy's ``dataset/test`` folder is not part of the benchmark.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.cross_domain_common import Expected, bscd_protocol, convert_class_folders

VERSION = "1"
NEEDS_RAW = True
SUBDIR = "dataset/train"
LAYOUT = "<raw>/dataset/train/<38 class folders, e.g. Apple___Apple_scab>/*.jpg"
EXPECTED = Expected(classes=38, images=43_456, splits=(0, 0, 38))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    return convert_class_folders(raw, out, source="crop_disease", version=VERSION, layout=LAYOUT,
                                 subdirs=(SUBDIR,), expected=EXPECTED, protocol=bscd_protocol,
                                 workers=workers, settings=settings)
