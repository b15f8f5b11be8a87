"""Labelled image arrays as a domain: the shared path of the small registry-shipped datasets.

These domains are out-of-domain targets, so every class is a test class. Images keep their
native resolution unless the caller's StorageSettings say otherwise, and keep their source order
within each class. Items are the (H, W) images themselves, so they pickle cheaply to workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.convert import ClassSpec, ConversionReport, StorageSettings, write_domain


def array_image(image: np.ndarray) -> np.ndarray:
    """The load function of array domains: each item already is its (H, W) uint8 image."""
    return image


def check_labelled(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                   where: str) -> None:
    """Raise unless images are (N, H, W) uint8 and labels (N,) integers in [0, num_classes)."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{where}: images are {images.dtype} {images.shape}, "
                         "expected uint8 (N, H, W)")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels are {labels.dtype} {labels.shape}, "
                         "expected integer (N,)")
    if len(labels) != len(images):
        raise ValueError(f"{where}: {len(labels)} labels for {len(images)} images")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise ValueError(f"{where}: label {int(outside[0])} outside [0, {num_classes})")


def write_arrays(out: Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 *, source: str, version: str, workers: int = 1,
                 settings: StorageSettings | None = None,
                 extra_settings: dict | None = None) -> ConversionReport:
    """Write ``images`` (N, H, W) uint8 with ``labels`` in [0, len(class_names)) as test classes."""
    check_labelled(images, labels, len(class_names), where=source)
    classes = [ClassSpec(name, "test", list(images[labels == c]))
               for c, name in enumerate(class_names)]
    return write_domain(out, source=source, converter_version=version, classes=classes,
                        load=array_image, settings=settings or StorageSettings(short_side=None),
                        extra_settings=extra_settings, workers=workers)
