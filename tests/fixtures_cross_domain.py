"""Tiny raw trees in the exact layouts of the cross-domain sources, made of real files.

Every image of fixture class k is a solid colour ``colour(k)`` (grey level ``grey(k)`` for
X-rays), and the j-th file of a class by sorted name is ``10 + j`` pixels high, so a test can
check from the stored pixels which class an image went to and in which order.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from data_prep.store import DomainStore

WIDTH = 16
CUB_NAMES = [f"{i + 1:03d}.Bird_{chr(65 + i)}" for i in range(16)]
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012",
             "Ram C/V Cargo Van Minivan 2012", "BMW M3 Coupe 2012", "Fiat 500 Convertible 2012",
             "Honda Odyssey Minivan 2012", "Tesla Model S Sedan 2012"]
EUROSAT_NAMES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                 "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
ISIC_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
CHESTX_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                 "Pneumothorax"]
CHESTX_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                 "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                 "OriginalImagePixelSpacing[x", "y]", ""]


def colour(k: int) -> tuple[int, int, int]:
    """A colour at least 40 levels away from every other class's in some channel."""
    return 20 + 40 * (k % 6), 20 + 40 * (k // 6 % 6), 230 - 40 * (k // 36 % 6)


def grey(k: int) -> int:
    return 20 + 30 * k


def write_image(path: Path, fill: int | tuple[int, int, int], height: int = 10,
                width: int = WIDTH, mode: str | None = None) -> Path:
    """A solid image; the format follows the suffix (JPEG or PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = mode or ("L" if isinstance(fill, int) else "RGB")
    Image.new(mode, (width, height), fill).save(path, quality=95)
    return path


def write_corrupt(path: Path) -> Path:
    """A JPEG cut off after its header: the name says image, the decoder fails."""
    write_image(path, (1, 2, 3), height=40, width=40)
    path.write_bytes(path.read_bytes()[:120])
    return path


def class_folders(root: Path, names: Sequence[str], per_class: int | Sequence[int],
                  suffix: str = ".jpg", size: int | None = None) -> None:
    """``root/<name>/img_<j>.jpg`` with colour(k) for the k-th name and height 10 + j."""
    counts = [per_class] * len(names) if isinstance(per_class, int) else per_class
    for k, (name, count) in enumerate(zip(names, counts, strict=True)):
        for j in range(count):
            write_image(root / name / f"img_{j:03d}{suffix}", colour(k),
                        height=size or 10 + j, width=size or WIDTH)


def crop_disease(raw: Path, names: Sequence[str], per_class: int = 3) -> None:
    """Kaggle 'plant-disease' copy: dataset/train used, dataset/test present but not ours."""
    class_folders(raw / "dataset/train", names, per_class)
    class_folders(raw / "dataset/test", names[:1], 1)


def eurosat(raw: Path, names: Sequence[str] = EUROSAT_NAMES, per_class: int = 2) -> None:
    class_folders(raw / "2750", names, per_class, size=64)


def cub(raw: Path, num_classes: int = 16, per_class: int = 2) -> None:
    class_folders(raw / "CUB_200_2011/images", CUB_NAMES[:num_classes], per_class)
    (raw / "CUB_200_2011/classes.txt").write_text(
        "".join(f"{i + 1} {n}\n" for i, n in enumerate(CUB_NAMES[:num_classes])))


def places(raw: Path, names: Sequence[str], per_class: int) -> None:
    class_folders(raw / "places365_standard/train", names, per_class)


def plantae(raw: Path, counts: dict[str, int], prefix: str = "train_val_images/Plantae") -> None:
    class_folders(raw / prefix, list(counts), list(counts.values()))


def isic(raw: Path, rows: Sequence[tuple[str, int]], *, missing: Sequence[str] = (),
         csv_in_folder: bool = True, header: Sequence[str] = ("image", *ISIC_COLUMNS)) -> Path:
    """Ground truth with one one-hot row per (image id, class); ``missing`` ids get no file."""
    folder = raw / "ISIC2018_Task3_Training_GroundTruth" if csv_in_folder else raw
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ISIC2018_Task3_Training_GroundTruth.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for image, label in rows:
            writer.writerow([image] + ["1.0" if c == label else "0.0" for c in range(7)])
    for j, (image, label) in enumerate(sorted(rows)):
        if image not in missing:
            write_image(raw / "ISIC2018_Task3_Training_Input" / f"{image}.jpg", colour(label),
                        height=10 + j)
    (raw / "ISIC2018_Task3_Training_Input/LICENSE.txt").write_text("licence text\n")
    return path


def chestx(raw: Path, rows: Sequence[tuple[str, str, str | None]]) -> None:
    """Data_Entry_2017.csv with (image, findings, folder); folder None = listed, not on disk.

    An image whose finding is the k-th of CHESTX_LABELS has grey level grey(k); others 255.
    """
    raw.mkdir(parents=True, exist_ok=True)
    with (raw / "Data_Entry_2017.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CHESTX_HEADER)
        for image, findings, _ in rows:
            writer.writerow([image, findings, 0, 1, 58, "M", "PA", 2682, 2749, 0.143, 0.143, ""])
    for image, findings, folder in rows:
        if folder is not None:
            level = grey(CHESTX_LABELS.index(findings)) if findings in CHESTX_LABELS else 255
            write_image(raw / folder / image, level, mode="L")


def cars(raw: Path, names: Sequence[str], annotations: Sequence[tuple[str, int]],
         missing: Sequence[str] = ()) -> None:
    """cars_train/ + devkit .mat files; annotations are (file name, 1-based label)."""
    devkit = raw / "devkit"
    devkit.mkdir(parents=True)
    cells = np.empty((1, len(names)), dtype=object)
    cells[0, :] = list(names)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": cells})
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    records = np.array([(1, 2, 10, 8, np.uint8(label), name) for name, label in annotations],
                       dtype=fields).reshape(1, -1)
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": records})
    for name, label in annotations:
        if name not in missing:
            write_image(raw / "cars_train" / name, colour(label - 1))


def mean_colour(store: DomainStore, index: int) -> tuple[int, ...]:
    image = store.read(index).astype(float)
    return tuple(int(round(v)) for v in image.reshape(-1, image.shape[2]).mean(axis=0))


def assert_colours(store: DomainStore, expected: dict[str, int], tolerance: int = 6) -> None:
    """Every image of stored class ``name`` has colour(expected[name]) (or grey for 1 channel)."""
    for c, name in enumerate(store.class_names):
        k = expected[name]
        want = (grey(k),) if store.shapes[store.class_offsets[c], 2] == 1 else colour(k)
        for i in store.images_of_class(c):
            got = mean_colour(store, int(i))
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tolerance, \
                f"image {i} of class {name!r}: colour {got}, expected {want}"


def heights(store: DomainStore, c: int) -> list[int]:
    return [int(store.shapes[i, 0]) for i in store.images_of_class(c)]


def splits(store: DomainStore) -> dict[str, list[str]]:
    return {s: [store.class_names[c] for c in store.classes_in_split(s)]
            for s in ("train", "valid", "test")}
