"""GTSRB (Meta-Dataset source ``traffic_sign``): 43 sign classes, all of them test classes.

Class c = folder ``Final_Training/Images/{c:05d}``, named "{c:02d}.<name>" from the vendored
TrafficSign_labels.txt. The per-folder annotation file GT-{c:05d}.csv is left out.

Image order: the folders hold 30-frame tracks of one physical sign, so Meta-Dataset shuffles each
class. Reproduced exactly: its DatasetConverter seed is 22 and the traffic-sign converter passes
``shuffle_with_seed=seed + 1``, i.e. 23; for every class it creates a fresh
``np.random.RandomState(23)`` and shuffles the class's sorted file list (GT csv excluded) in
place. We do the same with the legacy RandomState (a numpy Generator would give another order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import class_folders
from data_prep.sources.metadataset_common import (
    class_files,
    find_root,
    label_names,
    layout_error,
    load_rgb,
    split_list_classes,
    write_metadataset,
)

SOURCE = "traffic_sign"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
GTSRB/                                 <- --raw (GTSRB_Final_Training_Images.zip, unpacked)
  Final_Training/Images/000NN/*.ppm    43 folders 00000 ... 00042, 39,209 images
  Final_Training/Images/000NN/GT-000NN.csv   (annotations, not used)"""
SHUFFLE_SEED = 23  # Meta-Dataset: DatasetConverter seed 22, + 1 for traffic signs


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    images = find_root(raw, SOURCE, LAYOUT, "Final_Training/Images", ("GTSRB",))
    images = images / "Final_Training" / "Images"
    names = label_names("TrafficSign_labels.txt")
    found = {}
    for folder in class_folders(images):
        label = _label(folder, len(names))
        found[f"{label:02d}.{names[label]}"] = shuffled(
            class_files(folder, exclude=[f"GT-{label:05d}.csv"]))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_rgb, split_source="Meta-Dataset splits/traffic_sign_splits.json",
        workers=workers, settings=settings,
        extra={"image_order": f"per class: np.random.RandomState({SHUFFLE_SEED}).shuffle("
                              "sorted files), as Meta-Dataset"})


def shuffled(files: list[str]) -> list[str]:
    """Meta-Dataset's per-class order: a fresh RandomState(23) shuffles the sorted list."""
    np.random.RandomState(SHUFFLE_SEED).shuffle(files)
    return files


def _label(folder: Path, num_classes: int) -> int:
    if not (folder.name.isdigit() and len(folder.name) == 5 and int(folder.name) < num_classes):
        raise layout_error(SOURCE, LAYOUT, f"unexpected class folder {folder}: expected "
                           f"00000 ... {num_classes - 1:05d}")
    return int(folder.name)
