"""CUB-200-2011 in the fine-grained benchmark of Tseng et al. 2020 (not Meta-Dataset's cu_birds).

Classes are the sorted ``NNN.Name`` folders with all their images; class index i goes to train
(even i), valid (i % 4 == 1) or test (i % 4 == 3) -> 100/50/50 classes.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.cross_domain_common import Expected, convert_class_folders, tseng_protocol

VERSION = "1"
NEEDS_RAW = True
# the roots cu_birds accepts for the same download: the CUB_200_2011 folder or its parent
SUBDIRS = ("images", "CUB_200_2011/images")
LAYOUT = ("<raw>/CUB_200_2011/images/<200 folders NNN.Name, e.g. 001.Black_footed_Albatross>/*.jpg"
          "\n(or <raw>/images/<200 folders> with <raw> the CUB_200_2011 folder itself)")
EXPECTED = Expected(classes=200, images=11_788, splits=(100, 50, 50))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    return convert_class_folders(raw, out, source="cub", version=VERSION, layout=LAYOUT,
                                 subdirs=SUBDIRS, expected=EXPECTED, protocol=tseng_protocol,
                                 workers=workers, settings=settings)
