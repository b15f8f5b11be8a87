"""Parts shared by the cross-domain sources: BSCD-FSL, Tseng et al. 2020 and ``image_folder``.

- scanning a "one folder per class" tree, reporting every entry that is not used;
- the two class-split protocols (BSCD-FSL: all test; Tseng: by class index modulo 4);
- checking a complete raw tree against the counts the benchmark specifies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.convert import (
    ClassSpec,
    ConversionReport,
    StorageSettings,
    merged,
    other_image_counts,
    warning,
    write_domain,
)
from data_prep.sources.common import IMAGE_SUFFIXES, LayoutError, load_image, require_raw
from data_prep.store import SPLITS

log = logging.getLogger(__name__)

NamedItems = Sequence[tuple[str, Sequence]]
Protocol = Callable[[NamedItems], tuple[list[ClassSpec], dict]]
_SHOWN = 10  # how many names of unused entries go into the provenance


class CountMismatchError(ValueError):
    """A raw tree that looks complete does not give the counts the benchmark specifies."""


@dataclass(frozen=True)
class Expected:
    """Counts of a complete download; ``images`` is None where the benchmark leaves it open."""

    classes: int
    images: int | None
    splits: tuple[int, int, int]  # classes in train, valid, test


@dataclass(frozen=True)
class FolderTree:
    """A folder-per-class tree: (class name, sorted image files) and every entry not used."""

    classes: list[tuple[str, list[Path]]]
    unused: list[Path]


def first_existing(root: Path, candidates: Sequence[str], source: str, layout: str) -> Path:
    """The first of ``candidates`` (relative to ``root``) that exists; else a layout error."""
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    raise LayoutError(f"{source}: none of {list(candidates)} exists under {root}.\n"
                      f"Expected raw layout for {source}:\n{layout}")


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES


def scan_class_folders(root: Path) -> FolderTree:
    """One class per sub-folder of ``root`` (sorted names), its image files in sorted order.

    Files at the top level and anything in a class folder that is not an image file (sub-folders,
    stray files) are returned in ``unused`` so the caller can report them.
    """
    classes: list[tuple[str, list[Path]]] = []
    unused: list[Path] = []
    for entry in _sorted_entries(root):
        if not entry.is_dir():
            unused.append(Path(entry.path))
            continue
        inside = _sorted_entries(Path(entry.path))
        classes.append((entry.name, [Path(e.path) for e in inside if _is_image(e)]))
        unused.extend(Path(e.path) for e in inside if not _is_image(e))
    return FolderTree(classes, unused)


def unused_record(source: str, unused: Sequence[Path]) -> dict:
    """Log raw entries that were not converted and describe them for the provenance."""
    if not unused:
        return {"unused_entries": 0}
    shown = [str(p) for p in unused[:_SHOWN]]
    return merged({"unused_entries": len(unused), "unused_examples": shown},
                  warning(source, f"{len(unused)} entries are not image files in a class folder "
                                  f"and were not converted, e.g. {shown}"))


def bscd_protocol(named: NamedItems) -> tuple[list[ClassSpec], dict]:
    """BSCD-FSL: every class is a test class (the source domain is ImageNet)."""
    classes = [ClassSpec(name, "test", list(items)) for name, items in named]
    return classes, {"protocol": "bscd-fsl: every class is a test class"}


def tseng_split(index: int) -> str:
    """Tseng et al. 2020: base = even index, valid = index % 4 == 1, novel = index % 4 == 3."""
    return "train" if index % 2 == 0 else ("valid" if index % 4 == 1 else "test")


def tseng_protocol(named: NamedItems) -> tuple[list[ClassSpec], dict]:
    """Split classes by their index in ``named`` and list them train -> valid -> test.

    The store needs contiguous splits, so classes are reordered (stably); ``original_index[c]``
    in the provenance is the benchmark's index of stored class ``c``.
    """
    specs = [ClassSpec(name, tseng_split(i), list(items)) for i, (name, items) in enumerate(named)]
    order = sorted(range(len(specs)), key=lambda i: SPLITS.index(specs[i].split))
    extra = {"protocol": "tseng2020: index i -> train if i is even, valid if i % 4 == 1, "
                         "test if i % 4 == 3",
             "original_index": order}
    return [specs[i] for i in order], extra


def observed_counts(classes: Sequence[ClassSpec]) -> Expected:
    splits = tuple(sum(c.split == split for c in classes) for split in SPLITS)
    return Expected(len(classes), sum(len(c.items) for c in classes), splits)


def check_expected(source: str, classes: Sequence[ClassSpec], expected: Expected, *,
                   full: bool) -> dict:
    """Compare the listed classes with the benchmark's counts; returns provenance.

    ``full`` says the raw tree is at least as large as the benchmark's download in the dimension
    that defines it (class folders, CSV rows): then other class or split counts are an error,
    because results on it would not be the benchmark's. Other image counts with every class (a
    sample, a test set) only warn, as for Meta-Dataset; so does a smaller tree.
    """
    found = observed_counts(classes)
    record = {"expected_counts": asdict(expected), "tree": "full" if full else "partial",
              "images_found": found.images}
    if not full:
        return merged(record, warning(
            source, f"partial raw tree ({found.classes} classes, {found.images} images listed; "
                    f"the benchmark has {asdict(expected)}): the output is not the benchmark's "
                    "domain"))
    differences = [f"{key}: expected {want}, found {got}"
                   for key, want, got in zip(("classes", "splits"),
                                             (expected.classes, expected.splits),
                                             (found.classes, found.splits), strict=True)
                   if want != got]
    if differences:
        raise CountMismatchError(f"{source}: the raw tree looks complete but does not match the "
                                 f"benchmark ({'; '.join(differences)}); check the download "
                                 "against docs/datasets_cross_domain.md")
    images = [] if expected.images in (None, found.images) else \
        [f"{found.images} vs {expected.images} images"]
    return merged(record, other_image_counts(source, "the benchmark", images))


def convert_class_folders(
    raw: Path | None,
    out: Path,
    *,
    source: str,
    version: str,
    layout: str,
    subdirs: Sequence[str],
    expected: Expected,
    protocol: Protocol,
    per_class: int | None = None,
    workers: int = 1,
    settings: StorageSettings | None = None,
) -> ConversionReport:
    """Convert ``<raw>/<subdir>/<class folder>/<image>`` (sorted folders) with ``protocol``,
    ``subdir`` the first of ``subdirs`` that exists.

    ``per_class`` keeps the first that many files of each class by sorted name.
    """
    root = first_existing(require_raw(raw, source, layout), subdirs, source, layout)
    tree = scan_class_folders(root)
    if not tree.classes:
        raise LayoutError(f"{source}: no class folders in {root}.\n"
                          f"Expected raw layout for {source}:\n{layout}")
    named = [(name, files[:per_class]) for name, files in tree.classes]
    classes, extra = protocol(named)
    extra = merged(extra, check_expected(source, classes, expected,
                                         full=len(tree.classes) >= expected.classes),
                   unused_record(source, tree.unused))
    if per_class is not None:
        beyond = sum(max(0, len(files) - per_class) for _, files in tree.classes)
        extra |= {"per_class_limit": per_class, "files_beyond_limit": beyond}
    return write_domain(out, source=source, converter_version=version, classes=classes,
                        load=load_image, settings=settings, extra_settings=extra,
                        workers=workers)
