"""Meta-Dataset converters, source by source: the awkward parts of each download."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fixtures_metadataset import (
    aircraft_tree,
    fungi_tree,
    image_bytes,
    mscoco_tree,
    omniglot_tree,
    quickdraw_tree,
    traffic_sign_tree,
    vgg_flower_tree,
    write,
)
from PIL import Image

from data_prep.convert import StorageSettings
from data_prep.sources import source_module
from data_prep.sources.mscoco import crop_box
from data_prep.store import DomainStore

LENIENT = StorageSettings(max_bad_fraction=0.5)  # tiny trees: one bad file is a large fraction


def convert(source: str, raw: Path, tmp: Path, **kwargs) -> DomainStore:
    out = tmp / f"{source}.h5"
    source_module(source).convert(raw, out, **kwargs)
    return DomainStore(out)


def mean_colour(store: DomainStore, index: int) -> np.ndarray:
    return store.read(index).reshape(-1, store.shapes[index][2]).mean(axis=0)


def halves(width: int, height: int) -> bytes:
    """A JPEG whose left half is red and right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# -- aircraft -------------------------------------------------------------------------------------
def test_aircraft_variants_with_spaces_boxes_and_a_corrupt_image(tmp_path):
    image = halves(16, 12)
    raw = aircraft_tree(tmp_path, {
        "0000002": ("Cessna 172", image, (9, 1, 16, 12)),  # right (blue) half, in bounds
        "0000001": ("Cessna 172", image, (3, 2, 12, 9)),
        "0000003": ("BAE 146-200", image, (5, 4, 20, 30)),  # beyond the border: clipped
        "0000004": ("A340-300", image, (1, 1, 16, 12)),
        "0000005": ("737-400", b"not a jpeg", (1, 1, 16, 12)),
        "0000006": ("737-400", image, (1, 1, 8, 12)),  # red half
    }, test_ids=("0000005", "0000006"))
    store = convert("aircraft", raw, tmp_path, settings=LENIENT)
    # split-list order: A340-300 (0), Cessna 172 (10), BAE 146-200 (7) are train, 737-400 test
    assert store.class_names == ["A340-300", "BAE 146-200", "Cessna 172", "737-400"]
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [3, 0, 1]
    assert store.class_sizes.tolist() == [1, 1, 2, 1]
    # Meta-Dataset's box convention: the 1-based numbers go to PIL's crop unchanged
    sizes = [tuple(s[:2]) for s in store.shapes]  # (height, width)
    assert sizes == [(11, 15), (8, 11), (7, 9), (11, 7), (11, 7)]
    blue, red = mean_colour(store, 3), mean_colour(store, 4)
    assert blue[2] > 200 > 40 > blue[0] and red[0] > 200 > 40 > red[2]
    assert [Path(n).name for n, _ in store.skipped] == ["0000005.jpg"]
    assert store.attrs["settings"]["download"] == "partial"


def test_aircraft_bad_annotation_lines_are_named(tmp_path):
    raw = aircraft_tree(tmp_path, {"0000001": ("Cessna 172", halves(8, 8), (1, 1, 8, 8))})
    data = raw / "data"
    write(data / "images_box.txt", "0000001 1 1 8\n")
    with pytest.raises(ValueError, match=r"images_box.txt:1: expected"):
        convert("aircraft", raw, tmp_path)
    write(data / "images_box.txt", "0000001 1 1 8 8\n")
    write(data / "images_variant_test.txt", "0000009 Cessna 999\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt:1: variant 'Cessna 999'"):
        convert("aircraft", raw, tmp_path)


# -- traffic_sign ---------------------------------------------------------------------------------
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def test_traffic_sign_shuffles_each_class_like_meta_dataset(tmp_path):
    ppms = [image_bytes("PPM", colour=c) for c in COLOURS]
    raw = traffic_sign_tree(tmp_path, {14: ppms, 2: ppms[:2]})
    store = convert("traffic_sign", raw, tmp_path)
    assert store.class_names == ["02.Speed limit (50km/h)", "14.Stop"]
    assert store.class_sizes.tolist() == [2, 6]  # GT-000NN.csv is not an image
    order = [int(np.argmin([np.abs(mean_colour(store, i) - c).sum() for c in COLOURS]))
             for i in range(2, 8)]
    # np.random.RandomState(23).shuffle of 6 sorted files, fixed by Meta-Dataset's seed
    assert order == [5, 4, 2, 1, 0, 3]
    assert store.attrs["settings"]["image_order"].startswith("per class: np.random.RandomState(23)")


def test_traffic_sign_unexpected_folder(tmp_path):
    raw = traffic_sign_tree(tmp_path, {0: [image_bytes("PPM")]})
    (raw / "Final_Training" / "Images" / "00043").mkdir()
    with pytest.raises(FileNotFoundError, match="00043: expected 00000 ... 00042"):
        convert("traffic_sign", raw, tmp_path)


# -- vgg_flower -----------------------------------------------------------------------------------
def test_vgg_flower_labels_are_one_based_in_file_order(tmp_path):
    images = [image_bytes("JPEG", colour=c) for c in COLOURS[:4]]
    raw = vgg_flower_tree(tmp_path, [90, 5, 90, 10], images)
    store = convert("vgg_flower", raw, tmp_path)
    assert store.class_names == ["090.canna lily", "010.globe thistle", "005.english marigold"]
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [1, 1, 1]
    assert store.class_sizes.tolist() == [2, 1, 1]
    # canna lily holds image_00001 (red) then image_00003 (blue)
    assert mean_colour(store, 0)[0] > 200 and mean_colour(store, 1)[2] > 200


def test_vgg_flower_label_out_of_range(tmp_path):
    raw = vgg_flower_tree(tmp_path, [3, 103])
    with pytest.raises(ValueError, match="label 103 of image 2 is not an integer in"):
        convert("vgg_flower", raw, tmp_path)


# -- fungi ----------------------------------------------------------------------------------------
def test_fungi_merges_train_and_val_with_id_prefixed_names(tmp_path):
    categories = {1334: "Inocybe rimosa", 543: "Inocybe rimosa", 226: "Cortinarius malicorius"}
    raw = fungi_tree(tmp_path, categories, train={"b.JPG": 1334, "a.JPG": 543, "z.JPG": 1334},
                     val={"c.JPG": 1334, "d.JPG": 226})
    store = convert("fungi", raw, tmp_path)
    assert store.class_names == ["0226.Cortinarius malicorius", "1334.Inocybe rimosa",
                                 "0543.Inocybe rimosa"]
    assert store.class_sizes.tolist() == [1, 3, 1]
    settings = store.attrs["settings"]
    assert settings["download"] == "partial" and settings["missing_classes"] == 1391


def test_fungi_unannotated_image_is_named(tmp_path):
    raw = fungi_tree(tmp_path, {226: "Cortinarius malicorius"}, {"a.JPG": 226}, {"b.JPG": 226})
    val = json.loads((raw / "val.json").read_text())
    val["annotations"] = []
    write(raw / "val.json", json.dumps(val))
    with pytest.raises(ValueError, match="1 images have no annotation, e.g. image 2"):
        convert("fungi", raw, tmp_path)


# -- mscoco ---------------------------------------------------------------------------------------
def meta_dataset_crop(bbox, image_w, image_h, scale_ratio=1.2):
    """Meta-Dataset's MSCOCOConverter box arithmetic, transcribed as the test oracle."""
    x, y, w, h = bbox
    x = x - 0.5 * w * (scale_ratio - 1.0)
    y = y - 0.5 * h * (scale_ratio - 1.0)
    w = w * scale_ratio
    h = h * scale_ratio
    return (max(int(round(x - 0.5)), 0), max(int(round(y - 0.5)), 0),
            min(int(round(x + w - 0.5)) + 1, image_w), min(int(round(y + h - 0.5)) + 1, image_h))


def test_mscoco_crop_box_rounds_like_meta_dataset():
    assert crop_box([3, 5, 0, 0]) == (2, 4, 3, 5)  # round(2.5) = 2: half to even, not half up
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 300, (500, 4)),
                            rng.integers(0, 300, (500, 4)) / 2])  # many exact halves
    for bbox in boxes.tolist():
        left, top, right, bottom = crop_box(bbox)
        assert (left, top, min(right, 320), min(bottom, 240)) == \
            meta_dataset_crop(bbox, 320, 240)


def test_mscoco_crops_clipping_and_empty_boxes(tmp_path, caplog):
    categories = {1: "person", 10: "traffic light", 2: "bicycle"}
    raw = mscoco_tree(tmp_path, categories, {7: halves(100, 80), 3: halves(100, 80)}, [
        (7, 10, (10, 20, 30, 40)),  # -> (7, 16, 43, 65): 36 x 49
        (7, 10, (90, 70, 20, 20)),  # touches the border: clipped to (88, 68, 100, 80)
        (7, 1, (120, 10, 5, 5)),  # right of the image: empty after clipping, skipped
        (3, 1, (60, 10, 20, 20)),
        (3, 2, (5, 5, 10, 10)),
    ], annotations_folder=True)
    with caplog.at_level(logging.WARNING):
        store = convert("mscoco", raw, tmp_path, settings=LENIENT)
    assert store.class_names == ["person", "traffic light", "bicycle"]
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [0, 2, 1]
    assert store.class_sizes.tolist() == [1, 2, 1]  # person: one crop kept, one skipped
    assert [tuple(s[:2]) for s in store.shapes] == [(25, 25), (49, 36), (12, 12), (13, 13)]
    assert mean_colour(store, 0)[2] > 200  # image 3's crop, x 58..82, lies in the blue half
    ((name, reason),) = store.skipped
    assert name.endswith("000000000007.jpg") and "empty crop" in reason
    assert "empty crop" in caplog.text


# -- quickdraw ------------------------------------------------------------------------------------
def test_quickdraw_rows_become_28px_images_exactly(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows = {"police car": rng.integers(0, 256, (3, 784), dtype=np.uint8),
            "The Eiffel Tower": rng.integers(0, 256, (2, 784), dtype=np.uint8),
            "yoga": rng.integers(0, 256, (1, 784), dtype=np.uint8)}
    raw = quickdraw_tree(tmp_path, rows)
    write(raw / "README.txt", "downloaded with gsutil")
    with caplog.at_level(logging.WARNING):
        store = convert("quickdraw", raw, tmp_path, workers=2)
    assert "ignoring 1 entries" in caplog.text and "README.txt" in caplog.text
    assert store.class_names == ["police car", "The Eiffel Tower", "yoga"]
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [2, 0, 1]
    expected = np.concatenate([rows["police car"], rows["The Eiffel Tower"], rows["yoga"]])
    for i, row in enumerate(expected):
        assert np.array_equal(store.read(i), row.reshape(28, 28, 1))  # lossless, native size


def test_quickdraw_wrong_array_shape(tmp_path):
    raw = quickdraw_tree(tmp_path, {"yoga": np.zeros((2, 28, 28), np.uint8)})
    with pytest.raises(ValueError, match=r"yoga.npy: expected an \[N, 784\] uint8 array, found "
                                         r"\[2, 28, 28\] uint8"):
        convert("quickdraw", raw, tmp_path)


# -- omniglot -------------------------------------------------------------------------------------
def test_omniglot_splits_inverts_and_keeps_alphabets(tmp_path, caplog):
    raw = omniglot_tree(
        tmp_path,
        background={"Tagalog": {"character02": 1, "character01": 2}, "Latin": {"character01": 1},
                    "Alphabet_of_the_Magi": {"character01": 1}},
        evaluation={"ULOG": {"character01": 1}, "Angelic": {"character03": 1}})
    stroke = np.zeros((6, 6), bool)
    stroke[2:4, 1:5] = True  # a white (True) bar on black, like the raw images' '1' mode
    Image.fromarray(stroke).save(raw / "images_background/Latin/character01/character01_00.png")
    with caplog.at_level(logging.WARNING):
        store = convert("omniglot", raw, tmp_path)
    assert store.class_names == ["Latin-character01", "Tagalog-character01",
                                 "Tagalog-character02", "Alphabet_of_the_Magi-character01",
                                 "Angelic-character03", "ULOG-character01"]
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [1, 3, 2]
    assert store.hierarchy.node_names == ("Latin", "Tagalog", "Alphabet_of_the_Magi", "Angelic",
                                          "ULOG")
    assert store.hierarchy.class_parent.tolist() == [0, 1, 1, 2, 3, 4]
    assert np.array_equal(store.read(0)[:, :, 0], np.where(stroke, 0, 255))
    assert store.shapes[0].tolist() == [6, 6, 1]
    assert "1617 of 1623 Meta-Dataset classes are missing" in caplog.text
