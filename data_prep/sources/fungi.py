"""FGVCx Fungi 2018 (Meta-Dataset source ``fungi``): 1,394 species from train.json + val.json.

The competition's train and val sets (COCO-style JSON) are merged. Class = category, named
"{id:04d}.<name>" because some species names repeat under different ids; split by Meta-Dataset's
split list. Files of a class in sorted path order (Meta-Dataset kept JSON order; the images of
each class are the same).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.common import require
from data_prep.sources.metadataset_common import (
    find_root,
    load_rgb,
    split_list_classes,
    write_metadataset,
)

SOURCE = "fungi"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
fungi/                           <- --raw (fungi_train_val.tgz + train_val_annotations.tgz)
  train.json, val.json           COCO-style: images, annotations, categories
  images/<NNNNN_Species>/*.JPG   89,760 images, paths as in the JSON 'file_name'"""


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "train.json", ("fungi",))
    train, val = (_read(require(root / n, SOURCE, LAYOUT)) for n in ("train.json", "val.json"))
    if train["categories"] != val["categories"]:
        raise ValueError(f"{root}: train.json and val.json list different categories")
    names = {c["id"]: f"{c['id']:04d}.{c['name']}" for c in train["categories"]}
    files = _image_files(root, train["images"] + val["images"])
    found: dict[str, list[str]] = {name: [] for name in names.values()}
    for image_id, category in _image_labels(root, train["annotations"] + val["annotations"],
                                            files, names).items():
        found[names[category]].append(files[image_id])
    for items in found.values():
        items.sort()
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_rgb, split_source="Meta-Dataset splits/fungi_splits.json", workers=workers,
        settings=settings)


def _read(path: Path) -> dict:
    data = json.loads(path.read_text())
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ValueError(f"{path}: missing COCO keys {missing}")
    return data


def _image_files(root: Path, images: list[dict]) -> dict[int, str]:
    files: dict[int, str] = {}
    for image in images:
        if image["id"] in files:
            raise ValueError(f"{root}: image id {image['id']} appears twice in train/val.json")
        files[image["id"]] = str(root / image["file_name"])
    return files


def _image_labels(root: Path, annotations: list[dict], files: dict[int, str],
                  names: dict[int, str]) -> dict[int, int]:
    """Image id -> category id; every image must carry exactly one annotation."""
    labels: dict[int, int] = {}
    for ann in annotations:
        image_id, category = ann["image_id"], ann["category_id"]
        if image_id not in files:
            raise ValueError(f"{root}: an annotation refers to unknown image id {image_id}")
        if image_id in labels:
            raise ValueError(f"{root}: image {image_id} is annotated more than once")
        if category not in names:
            raise ValueError(f"{root}: image {image_id} has unknown category id {category}")
        labels[image_id] = category
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} images have no annotation, e.g. image "
                         f"{unlabelled[0]} ({files[unlabelled[0]]})")
    return labels
