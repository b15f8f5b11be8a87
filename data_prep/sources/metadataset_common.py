"""What the ten Meta-Dataset converters share: the vendored reference data, the raw-tree helpers,
and the final step that checks the class list against Meta-Dataset's spec and writes the domain.

The reference files (split lists, dataset specs, label files, ImageNet duplicate lists) are copied
unchanged from google-research/meta-dataset (Apache-2.0; see data_prep/reference/meta_dataset/).

Completeness rule, the same for every source: a raw tree that holds every class of Meta-Dataset's
spec is a full download, and its per-split class counts must equal the spec's (else an error);
a tree that lacks classes is a partial download: it converts what is there and logs a warning
with how many classes are missing, since class ids then differ from Meta-Dataset's. A class
that is in the tree but has no images is always an error (a broken extraction, never intended).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from PIL import Image

from data_prep.convert import (
    ClassSpec,
    ConversionReport,
    Loader,
    StorageSettings,
    merged,
    other_image_counts,
    warning,
    write_domain,
)
from data_prep.sources.common import (
    LayoutError,
    class_folders,
    load_crop,
    load_image,
    require_raw,
)
from data_prep.store import SPLITS, Hierarchy

log = logging.getLogger(__name__)

REFERENCE = "google-research/meta-dataset@167609505780 (Apache-2.0)"
_SPEC_SPLITS = {"TRAIN": "train", "VALID": "valid", "TEST": "test"}


# -- vendored reference data ---------------------------------------------------------------------
def reference_text(name: str) -> str:
    """Text of a vendored file, ``name`` relative to data_prep/reference/meta_dataset/."""
    return resources.files("data_prep").joinpath("reference", "meta_dataset", name).read_text(
        encoding="utf-8")


@cache
def split_lists(source: str) -> dict[str, tuple[str, ...]]:
    """Meta-Dataset's class names per split for ``source``, in its class-id order."""
    lists = json.loads(reference_text(f"splits/{source}_splits.json"))
    return {split: tuple(lists[split]) for split in SPLITS}


def label_names(filename: str) -> list[str]:
    """Class names of VggFlower_labels.txt / TrafficSign_labels.txt (first line is a comment)."""
    return reference_text(filename).splitlines()[1:]


def imagenet_duplicates() -> frozenset[str]:
    """File names of ILSVRC-2012 images that also occur in Caltech-101/256 or CUB; Meta-Dataset
    matches them by base name only, and so do we."""
    names = set()
    for other in ("Caltech101", "Caltech256", "CUBirds"):
        for line in reference_text(f"ImageNet_{other}_duplicates.txt").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.add(os.path.basename(line.split("#")[0].strip()))
    return frozenset(names)


@dataclass(frozen=True)
class ReferenceSpec:
    """The counts Meta-Dataset's own conversion produced for one source."""

    class_names: tuple[str, ...]  # in class-id order
    split_counts: dict[str, int]  # classes per split
    images: dict[str, int]  # images per class name

    def names_in(self, split: str) -> tuple[str, ...]:
        start = sum(self.split_counts[s] for s in SPLITS[:SPLITS.index(split)])
        return self.class_names[start:start + self.split_counts[split]]


@cache
def reference_spec(source: str) -> ReferenceSpec:
    spec = json.loads(reference_text(f"dataset_specs/{source}_dataset_spec.json"))
    if "split_subgraphs" in spec:  # ImageNet: classes are the leaves of each split's subgraph
        leaves = {_SPEC_SPLITS[k]: sorted(n["wn_id"] for n in nodes if not n["children_ids"])
                  for k, nodes in spec["split_subgraphs"].items()}
        images = {wnid: spec["images_per_class"][k.upper()][wnid]
                  for k, wnids in leaves.items() for wnid in wnids}
        names = tuple(w for split in SPLITS for w in leaves[split])
        return ReferenceSpec(names, {s: len(leaves[s]) for s in SPLITS}, images)
    names = tuple(spec["class_names"][str(i)] for i in range(len(spec["class_names"])))
    images = {names[int(i)]: n for i, n in spec["images_per_class"].items()}
    if "classes_per_split" in spec:
        counts = {_SPEC_SPLITS[k]: n for k, n in spec["classes_per_split"].items()}
    else:  # Omniglot: superclasses are numbered train -> valid -> test
        counts, first = {}, 0
        for key in ("TRAIN", "VALID", "TEST"):
            supers = range(first, first + spec["superclasses_per_split"][key])
            counts[_SPEC_SPLITS[key]] = sum(spec["classes_per_superclass"][str(s)] for s in supers)
            first = supers.stop
    return ReferenceSpec(names, counts, images)


# -- raw tree -----------------------------------------------------------------------------------
def layout_error(source: str, layout: str, message: str) -> LayoutError:
    return LayoutError(f"{source}: {message}\nExpected raw layout for {source}:\n{layout}")


def find_root(raw: Path | None, source: str, layout: str, marker: str,
              nested: Sequence[str] = ()) -> Path:
    """The download's root: ``raw`` itself, one of its ``nested`` folders (the archive's own top
    folder), or else the one sub-folder of ``raw`` (any name) that holds ``marker`` (a path or
    a glob pattern relative to the root)."""
    raw = require_raw(raw, source, layout)
    for root in (raw, *(raw / n for n in nested)):
        if _holds(root, marker):
            return root
    below = [folder for folder in class_folders(raw) if _holds(folder, marker)]
    if len(below) > 1:
        raise layout_error(source, layout, f"several folders of {raw} hold {marker}: "
                           f"{_shown([str(b) for b in below])}; pass one of them as --raw")
    if below:
        log.info("%s: using %s as the download's root", source, below[0])
        return below[0]
    raise layout_error(source, layout, f"{raw / marker} does not exist (nor in a sub-folder)")


def _holds(root: Path, marker: str) -> bool:
    return next(root.glob(marker), None) is not None


def class_files(folder: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file of ``folder`` in sorted name order, as Meta-Dataset lists a class.

    Only the download's known extras are excluded; any other stray file stays in the list, so
    that it is reported as unreadable rather than silently dropped.
    """
    excluded = set(exclude)
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and e.name not in excluded)


def folder_classes(parent: Path, exclude: Iterable[str] = ()) -> dict[str, list[str]]:
    """Class name -> files, for a download with one folder per class under ``parent``."""
    return {folder.name: class_files(folder, exclude) for folder in class_folders(parent)}


def load_rgb(path: str) -> Image.Image:
    """A photo as RGB (Meta-Dataset converts every photo source to RGB)."""
    return load_image(path).convert("RGB")


def load_rgb_crop(item: tuple[str, Sequence[int]]) -> Image.Image:
    """``(path, (left, top, right, bottom))`` cropped (box clipped to the image) and as RGB."""
    return load_crop(item).convert("RGB")


# -- classes and the final write -----------------------------------------------------------------
def split_list_classes(source: str, layout: str, found: Mapping[str, Sequence]
                       ) -> list[ClassSpec]:
    """ClassSpecs in Meta-Dataset's order for the classes ``found`` in the raw tree."""
    lists = split_lists(source)
    known = {name for names in lists.values() for name in names}
    unknown = sorted(set(found) - known)
    if unknown:
        raise layout_error(source, layout, f"{len(unknown)} classes in the raw tree are not in "
                           f"Meta-Dataset's split list for {source}: {_shown(unknown)}")
    return [ClassSpec(name, split, found[name])
            for split in SPLITS for name in lists[split] if name in found]


def write_metadataset(out: Path, *, source: str, version: str, classes: Sequence[ClassSpec],
                      load: Loader, split_source: str, workers: int,
                      settings: StorageSettings | None,
                      extra: dict | None = None, hierarchy: Hierarchy | None = None
                      ) -> ConversionReport:
    """Check ``classes`` against the spec, then convert them with the shared engine."""
    empty = [c.name for c in classes if len(c.items) == 0]
    if empty:
        raise ValueError(f"{source}: {len(empty)} classes are in the raw tree but have no "
                         f"images (broken or unfinished extraction?): {_shown(empty)}")
    counts = {split: sum(c.split == split for c in classes) for split in SPLITS}
    extra_settings = merged({"split_source": split_source, "reference": REFERENCE,
                             "classes_per_split": counts},
                            check_against_spec(source, classes, counts), extra or {})
    return write_domain(out, source=source, converter_version=version, classes=classes,
                        load=load, settings=settings, extra_settings=extra_settings,
                        hierarchy=hierarchy, workers=workers)


def check_against_spec(source: str, classes: Sequence[ClassSpec], counts: dict[str, int]
                       ) -> dict:
    """Compare with the vendored spec: errors only for a full download (see module docstring)."""
    spec = reference_spec(source)
    present = {c.name for c in classes}
    missing = [name for name in spec.class_names if name not in present]
    partial = _warn_partial(source, spec, missing) if missing else {}
    if not missing and counts != spec.split_counts:
        extra = sorted(present - set(spec.class_names))
        raise ValueError(f"{source}: the raw tree holds every Meta-Dataset class but yields "
                         f"{counts} classes per split instead of {spec.split_counts}; classes "
                         f"not in the spec: {_shown(extra)}")
    differ = [f"{c.name!r} {len(c.items)} vs {spec.images[c.name]}" for c in classes
              if c.name in spec.images and len(c.items) != spec.images[c.name]]
    return merged({"download": "partial" if missing else "full",
                   "missing_classes": len(missing),
                   "classes_with_other_image_counts": len(differ)},
                  partial, other_image_counts(source, "Meta-Dataset's spec", differ))


def _warn_partial(source: str, spec: ReferenceSpec, missing: list[str]) -> dict:
    per_split = ", ".join(f"{split} {len(set(missing) & set(spec.names_in(split)))}"
                          f"/{spec.split_counts[split]}" for split in SPLITS)
    return warning(source, f"partial download: {len(missing)} of {len(spec.class_names)} "
                           f"Meta-Dataset classes are missing ({per_split}); the present ones "
                           "are converted, but class ids will not match Meta-Dataset's. "
                           f"Missing: {_shown(missing)}")


def _shown(names: Sequence[str], limit: int = 10) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(map(repr, names[:limit])) + more
