"""Fashion-MNIST (Zalando): 70,000 28x28 greyscale clothing images in 10 classes, all 'test'.

Raw files come from the Debian package ``dataset-fashion-mnist`` via ``fetch.py``; train and
t10k images are concatenated (train first), since every class is a few-shot target.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from data_prep.builtin.arrays import write_arrays
from data_prep.builtin.fetch import provenance
from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import require, require_raw

VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
<raw>/                              (python -m data_prep fetch fashion_mnist --dest <raw>)
  train-images-idx3-ubyte.gz      IDX uint8 (60000, 28, 28)
  train-labels-idx1-ubyte.gz      IDX uint8 (60000,)
  t10k-images-idx3-ubyte.gz       IDX uint8 (10000, 28, 28)
  t10k-labels-idx1-ubyte.gz       IDX uint8 (10000,)"""

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
_PARTS = ("train", "t10k")
_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes with ``ndim`` dimensions, as a numpy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _UBYTE or data[3] != ndim:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions "
                         f"(header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but "
                         f"{len(body)} bytes follow")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load(raw: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels, train then t10k."""
    images, labels = [], []
    for part in _PARTS:
        images.append(read_idx(require(raw / f"{part}-images-idx3-ubyte.gz", "fashion_mnist",
                                       LAYOUT), 3))
        labels.append(read_idx(require(raw / f"{part}-labels-idx1-ubyte.gz", "fashion_mnist",
                                       LAYOUT), 1))
        if len(images[-1]) != len(labels[-1]):
            raise ValueError(f"{raw}: {part} has {len(images[-1])} images but "
                             f"{len(labels[-1])} labels")
    return np.concatenate(images), np.concatenate(labels)


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    images, labels = load(require_raw(raw, "fashion_mnist", LAYOUT))
    return write_arrays(out, images, labels, CLASS_NAMES, source="fashion_mnist",
                        version=VERSION, workers=workers, settings=settings,
                        extra_settings=provenance(raw))
