"""MS-COCO 2017 train (Meta-Dataset source ``mscoco``): one example per instance box, 80 classes.

Class = category name, split by Meta-Dataset's split list (40 valid, 40 test, no train). Every
annotation of instances_train2017.json gives one crop of train2017/{image_id:012d}.jpg: the box
(x, y, w, h) is enlarged 1.2x about its centre, converted from COCO's half-integer pixel centres
to PIL's corner coordinates with Meta-Dataset's exact rounding (Python's round, half to even),
and clipped to the image. A crop that is empty after clipping is skipped and listed in the
report, as Meta-Dataset skips it. Crops of a class in (image id, annotation id) order.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings
from data_prep.sources.metadataset_common import (
    find_root,
    layout_error,
    load_rgb_crop,
    split_list_classes,
    write_metadataset,
)

SOURCE = "mscoco"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
mscoco/                                  <- --raw
  train2017/<image id, 12 digits>.jpg    train2017.zip, unpacked (118,287 images)
  instances_train2017.json               from annotations_trainval2017.zip; also found as
                                         annotations/instances_train2017.json"""
BOX_SCALE = 1.2
ANNOTATIONS = ("instances_train2017.json", "annotations/instances_train2017.json")


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "train2017", ("mscoco",))
    coco = _annotations(root)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    found: dict[str, list] = {name: [] for name in names.values()}
    for ann in sorted(coco["annotations"], key=lambda a: (a["image_id"], a["id"])):
        if ann["category_id"] not in names:
            raise ValueError(f"{root}: annotation {ann['id']} has unknown category id "
                             f"{ann['category_id']}")
        path = root / "train2017" / f"{ann['image_id']:012d}.jpg"
        found[names[ann["category_id"]]].append((str(path), crop_box(ann["bbox"])))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=split_list_classes(SOURCE, LAYOUT, found),
        load=load_rgb_crop, split_source="Meta-Dataset splits/mscoco_splits.json",
        workers=workers, settings=settings,
        extra={"box_scale": BOX_SCALE, "crop": "Meta-Dataset rounding, clipped to the image"})


def crop_box(bbox: list[float], scale: float = BOX_SCALE) -> tuple[int, int, int, int]:
    """COCO (x, y, w, h) -> PIL (left, top, right, bottom), enlarged ``scale`` times about the
    centre; left/top clipped at 0 (right/bottom are clipped to the image when it is loaded)."""
    x, y, w, h = bbox
    x, y = x - 0.5 * w * (scale - 1.0), y - 0.5 * h * (scale - 1.0)
    w, h = w * scale, h * scale
    return (max(round(x - 0.5), 0), max(round(y - 0.5), 0),
            round(x + w - 0.5) + 1, round(y + h - 0.5) + 1)


def _annotations(root: Path) -> dict:
    path = next((root / name for name in ANNOTATIONS if (root / name).exists()), None)
    if path is None:
        raise layout_error(SOURCE, LAYOUT, f"neither {root / ANNOTATIONS[0]} nor "
                           f"{root / ANNOTATIONS[1]} exists")
    coco = json.loads(path.read_text())
    missing = [key for key in ("annotations", "categories") if key not in coco]
    if missing:
        raise ValueError(f"{path}: missing COCO keys {missing}")
    return coco
