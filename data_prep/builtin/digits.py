"""scikit-learn's 8x8 digits (UCI optdigits test set): 1,797 images, classes '0'..'9', all 'test'.

The data ship inside the scikit-learn wheel, so no raw folder is needed. Pixels are counts 0..16
and are stored scaled to 0..255 (rounded) at the native 8x8 size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_digits

from data_prep.builtin.arrays import write_arrays
from data_prep.convert import ConversionReport, StorageSettings

VERSION = "1"
NEEDS_RAW = False
LAYOUT = "none: the data ship with scikit-learn (sklearn.datasets.load_digits)"

CLASS_NAMES = tuple(str(d) for d in range(10))
_MAX_COUNT = 16


def load() -> tuple[np.ndarray, np.ndarray]:
    """The (1797, 8, 8) uint8 images and their labels."""
    bunch = load_digits()
    images = np.rint(bunch.images * (255 / _MAX_COUNT)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    """``raw`` is ignored: the images come from the installed scikit-learn."""
    images, labels = load()
    return write_arrays(out, images, labels, CLASS_NAMES, source="digits", version=VERSION,
                        workers=workers, settings=settings,
                        extra_settings={"scikit_learn": sklearn.__version__})
