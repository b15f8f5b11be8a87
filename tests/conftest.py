"""Shared fixtures: tiny domain files built with the real writer, and a pickled-code payload."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from data_prep.convert import ClassSpec, write_domain


def make_domain(path: Path, splits: dict[str, int], images_per_class: int | list[int] = 4,
                size: int = 12, superclasses: int = 0, seed: int = 0) -> Path:
    """Write a small greyscale domain with the given number of classes per split."""
    rng = np.random.default_rng(seed)
    names = [(split, i) for split, n in splits.items() for i in range(n)]
    counts = (images_per_class if isinstance(images_per_class, list)
              else [images_per_class] * len(names))
    classes = [
        ClassSpec(
            name=f"{split}_{i}",
            split=split,
            items=[rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(count)],
            superclass=f"group_{c % superclasses}" if superclasses else None,
        )
        for c, ((split, i), count) in enumerate(zip(names, counts, strict=True))
    ]
    write_domain(path, source="synthetic", converter_version="test", classes=classes,
                 load=np.asarray)
    return path


@pytest.fixture
def tiny_domain(tmp_path: Path) -> Path:
    return make_domain(tmp_path / "tiny.h5", {"train": 4, "valid": 2, "test": 3}, superclasses=2)


class _Exploit:
    """Unpickling this runs a shell command that touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def pickled_code(tmp_path: Path) -> tuple[object, Path]:
    """(an object whose unpickling would execute code, the file that execution would create)."""
    marker = tmp_path / "executed"
    return _Exploit(marker), marker
