"""The registry of raw sources: name -> module that converts it.

Every source module defines ``VERSION`` (bump it when its output changes), ``LAYOUT`` (the raw
layout it expects, printed when the raw root is wrong), ``NEEDS_RAW`` and
``convert(raw, out, *, workers, settings) -> ConversionReport``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SOURCES: dict[str, str] = {
    # built-in default domains (no user download)
    "glyphs": "data_prep.builtin.glyphs",
    "fashion_mnist": "data_prep.builtin.fashion_mnist",
    "mnist": "data_prep.builtin.mnist",
    "animals": "data_prep.builtin.animals",
    "digits": "data_prep.builtin.digits",
}


def source_module(name: str) -> ModuleType:
    """Import the converter module of source ``name``; unknown names list the known ones."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    return importlib.import_module(SOURCES[name])
