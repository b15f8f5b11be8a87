"""Stanford Cars in the fine-grained benchmark of Tseng et al. 2020: the train half only.

Class = annotation label - 1 (the order of ``cars_meta.mat``'s ``class_names``); class index i
goes to train (even i), valid (i % 4 == 1) or test (i % 4 == 3) -> 98/49/49 classes. Whole images
are stored, as in Tseng's filelists (the annotation boxes are not used). Within a class, images
are in sorted file-name order. An annotated file that is not on disk is still listed, so the
conversion engine counts and reports it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from data_prep.convert import ConversionReport, StorageSettings, merged, write_domain
from data_prep.sources.common import load_image, require, require_raw
from data_prep.sources.cross_domain_common import Expected, check_expected, tseng_protocol

VERSION = "1"
NEEDS_RAW = True
LAYOUT = ("<raw>/cars_train/<NNNNN>.jpg\n"
          "<raw>/devkit/cars_train_annos.mat  (struct 'annotations' with fields class, fname)\n"
          "<raw>/devkit/cars_meta.mat         (cell 'class_names')")
EXPECTED = Expected(classes=196, images=8_144, splits=(98, 49, 49))


def _mat_variable(path: Path, key: str) -> np.ndarray:
    mat = loadmat(path, squeeze_me=True)
    if key not in mat:
        raise ValueError(f"{path}: no variable {key!r}; variables: {sorted(mat)}")
    return np.atleast_1d(mat[key]).reshape(-1)


def read_class_names(path: Path) -> list[str]:
    return [str(name) for name in _mat_variable(path, "class_names")]


def read_annotations(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """(file name, class index from 0) of every annotation."""
    annotations = _mat_variable(path, "annotations")
    fields = annotations.dtype.names or ()
    if "class" not in fields or "fname" not in fields:
        raise ValueError(f"{path}: 'annotations' needs fields 'class' and 'fname', has {fields}")
    pairs = [(str(name), int(label)) for name, label in
             zip(annotations["fname"], annotations["class"], strict=True)]
    for name, label in pairs:
        if not 1 <= label <= num_classes:
            raise ValueError(f"{path}: {name} has label {label}, expected 1..{num_classes} "
                             "(the classes of cars_meta.mat)")
    repeated = sorted(name for name, n in Counter(name for name, _ in pairs).items() if n > 1)
    if repeated:
        raise ValueError(f"{path}: files annotated more than once: {repeated[:10]}")
    return [(name, label - 1) for name, label in pairs]


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = require_raw(raw, "cars", LAYOUT)
    images = require(root / "cars_train", "cars", LAYOUT)
    names = read_class_names(require(root / "devkit/cars_meta.mat", "cars", LAYOUT))
    annotations = read_annotations(require(root / "devkit/cars_train_annos.mat", "cars", LAYOUT),
                                   len(names))
    files: list[list[Path]] = [[] for _ in names]
    for name, label in sorted(annotations):
        files[label].append(images / name)
    classes, extra = tseng_protocol(list(zip(names, files, strict=True)))
    extra = merged(extra, check_expected("cars", classes, EXPECTED,
                                         full=len(names) >= EXPECTED.classes))
    extra |= {"crop": "none: whole images, as Tseng et al."}
    return write_domain(out, source="cars", converter_version=VERSION, classes=classes,
                        load=load_image, settings=settings, extra_settings=extra, workers=workers)
