"""Builders of tiny raw trees in the exact download layout of each Meta-Dataset source.

Every builder writes real files (JPEG, PNG, PPM, .npy, .mat, JSON, text) and returns the folder
to pass as ``raw``. ``full_tree`` writes every class of Meta-Dataset's spec with one 8x8 image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from data_prep.sources.metadataset_common import label_names, reference_spec, reference_text

TINY = 8
Colour = tuple[int, int, int]


def image_bytes(fmt: str, size: tuple[int, int] = (TINY, TINY), colour: Colour = (200, 40, 40),
                mode: str = "RGB") -> bytes:
    """An image of one colour (``size`` is width, height) encoded as ``fmt`` (JPEG, PNG, PPM)."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def folder_tree(root: Path, classes: dict[str, Sequence[bytes]], suffix: str) -> Path:
    """``root/<class>/<i>.<suffix>`` for each image of each class."""
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(images):
            write(root / name / f"{name.split('.')[0]}_{i:04d}.{suffix}", data)
    return root


def cu_birds_tree(tmp: Path, classes: dict[str, Sequence[bytes]]) -> Path:
    folder_tree(tmp / "CUB_200_2011" / "images", classes, "jpg")
    return tmp / "CUB_200_2011"


def dtd_tree(tmp: Path, classes: dict[str, Sequence[bytes]]) -> Path:
    folder_tree(tmp / "dtd" / "images", classes, "jpg")
    if "waffled" in classes:
        write(tmp / "dtd" / "images" / "waffled" / ".directory", "[Dolphin]\nTimestamp=2013\n")
    return tmp / "dtd"


def traffic_sign_tree(tmp: Path, classes: dict[int, Sequence[bytes]]) -> Path:
    images = tmp / "GTSRB" / "Final_Training" / "Images"
    for label, ppms in classes.items():
        folder = images / f"{label:05d}"
        for i, data in enumerate(ppms):
            write(folder / f"{i // 30:05d}_{i % 30:05d}.ppm", data)
        write(folder / f"GT-{label:05d}.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;"
              "Roi.Y2;ClassId\n")
    return tmp / "GTSRB"


def aircraft_tree(tmp: Path, images: dict[str, tuple[str, bytes, Sequence[int]]],
                  test_ids: Sequence[str] = ()) -> Path:
    """``images``: image id -> (variant, JPEG bytes, 1-based box); ``test_ids`` go to the test
    list, the rest to trainval."""
    data = tmp / "fgvc-aircraft-2013b" / "data"
    variants = sorted({variant for variant, _, _ in images.values()})
    write(data / "variants.txt", "".join(f"{v}\n" for v in variants))
    lines = {"trainval": [], "test": []}
    for image_id, (variant, jpeg, _) in images.items():
        write(data / "images" / f"{image_id}.jpg", jpeg)
        lines["test" if image_id in test_ids else "trainval"].append(f"{image_id} {variant}\n")
    for part, rows in lines.items():
        write(data / f"images_variant_{part}.txt", "".join(rows))
    write(data / "images_box.txt", "".join(f"{i} {' '.join(map(str, box))}\n"
                                           for i, (_, _, box) in images.items()))
    return tmp / "fgvc-aircraft-2013b"


def vgg_flower_tree(tmp: Path, labels: Sequence[int], images: Sequence[bytes] | None = None
                    ) -> Path:
    root = tmp / "vgg_flower"
    for i in range(len(labels)):
        jpeg = images[i] if images is not None else image_bytes("JPEG")
        write(root / "jpg" / f"image_{i + 1:05d}.jpg", jpeg)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    return root


def fungi_tree(tmp: Path, categories: dict[int, str], train: dict[str, int],
               val: dict[str, int]) -> Path:
    """``train``/``val``: image file name -> category id; image ids run over both files."""
    root = tmp / "fungi"
    cats = [{"id": i, "name": name, "supercategory": "Fungi"} for i, name in categories.items()]
    image_id = 0
    for part, files in (("train", train), ("val", val)):
        images, annotations = [], []
        for name, category in files.items():
            image_id += 1
            file_name = f"images/{category:05d}_{categories[category].replace(' ', '_')}/{name}"
            write(root / file_name, image_bytes("JPEG"))
            images.append({"id": image_id, "file_name": file_name, "width": TINY,
                           "height": TINY})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": category})
        write(root / f"{part}.json", json.dumps(
            {"images": images, "annotations": annotations, "categories": cats}))
    return root


def mscoco_tree(tmp: Path, categories: dict[int, str], images: dict[int, bytes],
                annotations: Sequence[tuple[int, int, Sequence[float]]],
                annotations_folder: bool = False) -> Path:
    """``annotations``: (image id, category id, COCO box x y w h)."""
    root = tmp / "mscoco"
    for image_id, jpeg in images.items():
        write(root / "train2017" / f"{image_id:012d}.jpg", jpeg)
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
            "annotations": [{"id": 1000 + k, "image_id": i, "category_id": c, "bbox": list(b),
                             "iscrowd": 0} for k, (i, c, b) in enumerate(annotations)],
            "categories": [{"id": i, "name": n, "supercategory": "x"}
                           for i, n in categories.items()]}
    name = "annotations/instances_train2017.json" if annotations_folder else \
        "instances_train2017.json"
    write(root / name, json.dumps(coco))
    return root


def quickdraw_tree(tmp: Path, classes: dict[str, np.ndarray]) -> Path:
    root = tmp / "quickdraw"
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in classes.items():
        np.save(root / f"{name}.npy", rows)
    return root


def omniglot_tree(tmp: Path, background: dict[str, dict[str, int]],
                  evaluation: dict[str, dict[str, int]]) -> Path:
    """alphabet -> character -> number of 105x105-like stroke PNGs (here 8x8, mode '1')."""
    root = tmp / "omniglot"
    stroke = image_bytes("PNG", mode="1", colour=(1, 1, 1))
    for part, alphabets in (("images_background", background),
                            ("images_evaluation", evaluation)):
        (root / part).mkdir(parents=True, exist_ok=True)
        for alphabet, characters in alphabets.items():
            for character, n in characters.items():
                for i in range(n):
                    write(root / part / alphabet / character / f"{character}_{i:02d}.png", stroke)
    return root


def imagenet_tree(tmp: Path, is_a: Sequence[tuple[str, str]], words: dict[str, str],
                  classes: dict[str, Sequence[str]]) -> Path:
    """``classes``: wnid -> JPEG file names in its folder."""
    root = tmp / "ILSVRC2012_img_train"
    jpeg = image_bytes("JPEG")
    for wnid, files in classes.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for name in files:
            write(root / wnid / name, jpeg)
    write(root / "words.txt", "".join(f"{w}\t{text}\n" for w, text in words.items()))
    write(root / "wordnet.is_a.txt", "".join(f"{p} {c}\n" for p, c in is_a))
    return root


# -- full trees: every class of the spec, one tiny image each -----------------------------------
def full_tree(source: str, tmp: Path) -> Path:
    names = reference_spec(source).class_names
    jpeg = image_bytes("JPEG")
    if source in ("cu_birds", "dtd"):
        build = cu_birds_tree if source == "cu_birds" else dtd_tree
        return build(tmp, {name: [jpeg] for name in names})
    if source == "traffic_sign":
        return traffic_sign_tree(tmp, {i: [image_bytes("PPM")] for i in range(len(names))})
    if source == "aircraft":
        return aircraft_tree(tmp, {f"{i:07d}": (n, jpeg, (1, 1, TINY, TINY))
                                   for i, n in enumerate(names)})
    if source == "vgg_flower":
        return vgg_flower_tree(tmp, [int(n.split(".")[0]) for n in names])
    if source == "fungi":
        categories = {int(n[:4]): n[5:] for n in names}
        return fungi_tree(tmp, categories, {f"{c}_a.JPG": c for c in categories},
                          {f"{c}_b.JPG": c for c in list(categories)[::7]})
    if source == "mscoco":
        categories = {i + 1: n for i, n in enumerate(names)}
        return mscoco_tree(tmp, categories, {1: image_bytes("JPEG", (32, 24))},
                           [(1, c, (2.0, 2.0, 10.0, 8.0)) for c in categories])
    if source == "quickdraw":
        return quickdraw_tree(tmp, {n: np.full((1, 784), 255, np.uint8) for n in names})
    if source == "omniglot":
        return omniglot_tree(tmp, *omniglot_spec_alphabets())
    if source == "ilsvrc_2012":
        return full_imagenet(tmp)
    raise KeyError(source)


def omniglot_spec_alphabets() -> tuple[dict, dict]:
    """Background (train + valid) and evaluation (test) alphabets -> character -> 1 image,
    for every class of Meta-Dataset's Omniglot spec."""
    spec = reference_spec("omniglot")
    parts: tuple[dict, dict] = ({}, {})
    for part, splits in ((0, ("train", "valid")), (1, ("test",))):
        for name in (n for split in splits for n in spec.names_in(split)):
            alphabet, _, character = name.rpartition("-")
            parts[part].setdefault(alphabet, {})[character] = 1
    return parts


def full_imagenet(tmp: Path) -> Path:
    """All 1,000 classes; the WordNet files are rebuilt from the spec's three split subgraphs
    (their union holds every is-a link the official conversion kept)."""
    spec = json.loads(reference_text("dataset_specs/ilsvrc_2012_dataset_spec.json"))
    nodes = [n for split in spec["split_subgraphs"].values() for n in split]
    words = {n["wn_id"]: n["words"] for n in nodes}
    is_a = sorted({(n["wn_id"], c) for n in nodes for c in n["children_ids"]})
    classes = {w: [f"{w}_1.JPEG"] for w in reference_spec("ilsvrc_2012").class_names}
    return imagenet_tree(tmp, is_a, words, classes)


def traffic_sign_names() -> list[str]:
    return [f"{i:02d}.{name}" for i, name in enumerate(label_names("TrafficSign_labels.txt"))]
