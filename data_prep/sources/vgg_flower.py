"""Oxford 102 Flowers (Meta-Dataset source ``vgg_flower``): 102 species from imagelabels.mat.

imagelabels.mat holds one 1-based label per image in file-name order (label of
jpg/image_{i:05d}.jpg is labels[i - 1]); class l is named "{l:03d}.<name>" with the name from the
vendored VggFlower_labels.txt, and split by Meta-Dataset's split list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.metadataset_common import (
    find_root,
    label_names,
    load_rgb,
    split_list_classes,
    write_metadataset,
)

SOURCE = "vgg_flower"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
<folder>/                        <- --raw, or its parent
  imagelabels.mat                1-based label of each image, in file-name order
  jpg/image_00001.jpg ...        8,189 images (102flowers.tgz, unpacked)"""


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "imagelabels.mat")
    names = label_names("VggFlower_labels.txt")
    found: dict[str, list[str]] = {}
    for index, label in enumerate(read_labels(root / "imagelabels.mat", len(names)), 1):
        name = f"{label:03d}.{names[label - 1]}"
        found.setdefault(name, []).append(str(root / "jpg" / f"image_{index:05d}.jpg"))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_rgb, split_source="Meta-Dataset splits/vgg_flower_splits.json",
        workers=workers, settings=settings)


def read_labels(path: Path, num_classes: int) -> list[int]:
    """The 1-based labels of imagelabels.mat, checked to lie in [1, num_classes]."""
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable MATLAB file: {err}") from err
    if "labels" not in mat:
        raise ValueError(f"{path}: no 'labels' variable (found {sorted(mat)})")
    labels = np.asarray(mat["labels"]).ravel()
    bad = np.flatnonzero((labels < 1) | (labels > num_classes) | (labels != np.round(labels)))
    if len(bad):
        raise ValueError(f"{path}: label {labels[bad[0]].item()!r} of image {bad[0] + 1} is not an "
                         f"integer in [1, {num_classes}]")
    return [int(v) for v in labels]
