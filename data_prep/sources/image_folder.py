"""Any "one folder per class" tree as a domain: how a user adds a target domain by config only.

Raw layout: ``<raw>/<class name>/<image files>``; classes are the sorted folder names, images
in sorted file-name order. Top-level files and non-image entries in class folders are not
converted, and are counted in the provenance (``unused_entries``) and logged.

``convert`` takes, besides the registry's ``workers`` and ``settings``:

- ``split_file`` (optional path): which classes are train, valid and test, either JSON
  ``{"train": [names], "valid": [names], "test": [names]}`` (a missing key means no classes)
  or CSV with the header ``class,split`` and one row per class. Every class folder must be named
  exactly once, and only class folders may be named. Without it every class is a test class (a
  target domain for evaluation only).

Storage (short side, codec, quality, tolerated bad fraction) is ``settings`` as for every source.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_prep.convert import ClassSpec, ConversionReport, StorageSettings, write_domain
from data_prep.sources.common import LayoutError, load_image, require_raw
from data_prep.sources.cross_domain_common import scan_class_folders, unused_record
from data_prep.store import SPLITS

VERSION = "1"
NEEDS_RAW = True
LAYOUT = "<raw>/<class name>/<image files>  (one folder per class; optional split file)"


def _json_pairs(path: Path) -> list[tuple[str, str]]:
    document = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(document, dict) or not set(document) <= set(SPLITS):
        keys = list(document) if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{path}: expected an object with keys among {SPLITS}, got {keys}")
    pairs = []
    for split, names in document.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: {split!r} must be a list of class names")
        pairs.extend((name, split) for name in names)
    return pairs


def _csv_pairs(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"class", "split"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'class' and 'split', "
                             f"got {reader.fieldnames}")
        return [(row["class"], row["split"]) for row in reader]


def read_split_file(path: Path) -> dict[str, str]:
    """Class name -> split from a JSON or CSV split file."""
    readers = {".json": _json_pairs, ".csv": _csv_pairs}
    if path.suffix.lower() not in readers:
        raise ValueError(f"{path}: split file must end in .json or .csv")
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    assignment: dict[str, str] = {}
    for name, split in readers[path.suffix.lower()](path):
        if split not in SPLITS:
            raise ValueError(f"{path}: class {name!r} has split {split!r}, expected one of "
                             f"{SPLITS}")
        if name in assignment:
            raise ValueError(f"{path}: class {name!r} is listed twice ({assignment[name]!r} and "
                             f"{split!r})")
        assignment[name] = split
    return assignment


def assign_splits(names: Sequence[str], assignment: dict[str, str], path: Path) -> list[str]:
    """The split of each class folder; every folder named once, nothing else named."""
    unknown = sorted(set(assignment) - set(names))
    unassigned = [name for name in names if name not in assignment]
    problems = []
    if unknown:
        problems.append(f"names that are not class folders: {unknown}")
    if unassigned:
        problems.append(f"class folders it does not list: {unassigned}")
    if problems:
        raise ValueError(f"split file {path}: {'; '.join(problems)}")
    return [assignment[name] for name in names]


def ordered_classes(named: Iterable[tuple[str, list[Path]]], splits: Sequence[str]
                    ) -> list[ClassSpec]:
    """ClassSpecs train -> valid -> test, keeping the folder order within each split."""
    specs = [ClassSpec(name, split, files) for (name, files), split in zip(named, splits,
                                                                         strict=True)]
    return sorted(specs, key=lambda spec: SPLITS.index(spec.split))


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None,
            split_file: str | Path | None = None) -> ConversionReport:
    root = require_raw(raw, "image_folder", LAYOUT)
    tree = scan_class_folders(root)
    if not tree.classes:
        raise LayoutError(f"image_folder: no class folders in {root}; expected {LAYOUT}")
    names = [name for name, _ in tree.classes]
    extra = unused_record("image_folder", tree.unused)
    if split_file is None:
        splits = ["test"] * len(names)
        extra |= {"split_file": None, "protocol": "no split file: every class is a test class"}
    else:
        path = Path(split_file)
        splits = assign_splits(names, read_split_file(path), path)
        extra |= {"split_file": path.name, "protocol": "split file",
                  "split_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return write_domain(out, source="image_folder", converter_version=VERSION,
                        classes=ordered_classes(tree.classes, splits), load=load_image,
                        settings=settings, extra_settings=extra, workers=workers)
