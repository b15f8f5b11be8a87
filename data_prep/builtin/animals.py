"""Animal silhouettes (PyPI ``animal-mnist==0.4``): 10,000 28x28 images of 10 animals, all 'test'.

``fetch.py`` verified the wheel's hash and turned its pickled arrays into plain .npy files, read
here without pickle. The class names are the ten animals the wheel's METADATA lists, in its
alphabetical order; that label k is the k-th of them was checked by viewing images of each label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.builtin.arrays import write_arrays
from data_prep.builtin.fetch import provenance
from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import require, require_raw

VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
<raw>/              (python -m data_prep fetch animals --dest <raw>)
  images.npy        uint8 (N, 28, 28), white silhouettes on black
  labels.npy        int64 (N,), 0..9"""

CLASS_NAMES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep",
               "Zebra")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a plain .npy array ({err})") from err


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    raw = require_raw(raw, "animals", LAYOUT)
    images = _load_npy(require(raw / "images.npy", "animals", LAYOUT))
    labels = _load_npy(require(raw / "labels.npy", "animals", LAYOUT))
    return write_arrays(out, images, labels, CLASS_NAMES, source="animals", version=VERSION,
                        workers=workers, settings=settings,
                        extra_settings=provenance(raw))
