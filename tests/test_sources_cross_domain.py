"""BSCD-FSL sources (CropDisease, EuroSAT, ISIC, ChestX) and the shared count check."""

from __future__ import annotations

import json
import logging
import shutil

import fixtures_cross_domain as fx
import pytest

from data_prep.convert import ClassSpec, StorageSettings, report_path
from data_prep.sources import chestx, crop_disease, eurosat, isic
from data_prep.sources.common import LayoutError
from data_prep.sources.cross_domain_common import CountMismatchError, Expected, check_expected
from data_prep.store import DomainStore

# tiny trees hold one bad file among a handful: tolerate it so that it is counted, not fatal
TOLERANT = StorageSettings(max_bad_fraction=0.5)


def _settings(store: DomainStore) -> dict:
    return store.attrs["settings"]


# -- the count check ----------------------------------------------------------------------------
def _specs(sizes: list[int], split: str = "test") -> list[ClassSpec]:
    return [ClassSpec(f"c{i}", split, ["x"] * n) for i, n in enumerate(sizes)]


def test_check_expected_full_tree_matching_counts_passes() -> None:
    record = check_expected("s", _specs([2, 3]), Expected(2, 5, (0, 0, 2)), full=True)
    assert record == {"expected_counts": {"classes": 2, "images": 5, "splits": (0, 0, 2)},
                      "tree": "full", "images_found": 5}


def test_check_expected_full_tree_with_other_class_counts_names_each_difference() -> None:
    message = r"classes: expected 3, found 2; splits: expected \(1, 0, 2\), found \(0, 0, 2\)"
    with pytest.raises(CountMismatchError, match=message):
        check_expected("s", _specs([2, 3]), Expected(3, 5, (1, 0, 2)), full=True)


def test_check_expected_every_class_fewer_images_warns_like_meta_dataset(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        record = check_expected("s", _specs([2, 3]), Expected(2, 6, (0, 0, 2)), full=True)
    assert record["tree"] == "full" and record["images_found"] == 5
    assert record["warnings"] == ["s: other image counts than the benchmark (found vs "
                                  "expected): 5 vs 6 images; converted all the same, but "
                                  "results are not on the benchmark's full domain"]
    assert record["warnings"][0] in caplog.text


def test_check_expected_open_image_count_is_not_compared() -> None:
    assert check_expected("s", _specs([2, 3]), Expected(2, None, (0, 0, 2)),
                          full=True)["tree"] == "full"


def test_check_expected_partial_tree_warns_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        record = check_expected("s", _specs([2]), Expected(2, 6, (0, 0, 2)), full=False)
    assert record["tree"] == "partial"
    assert "s: partial raw tree (1 classes, 2 images" in caplog.text


# -- CropDisease --------------------------------------------------------------------------------
CROP_NAMES = ["Apple___Apple_scab", "Corn_(maize)___Common_rust_", "Tomato___healthy"]


def test_crop_disease_sorted_folders_all_test_corrupt_image_counted(tmp_path) -> None:
    raw = tmp_path / "raw"
    fx.crop_disease(raw, list(reversed(CROP_NAMES)), per_class=3)  # fixture k != sorted index
    bad = fx.write_corrupt(raw / "dataset/train/Tomato___healthy/img_001.jpg")
    (raw / "dataset/train/README.txt").write_text("not a class\n")
    out = tmp_path / "crop.h5"

    report = crop_disease.convert(raw, out, settings=TOLERANT)

    store = DomainStore(out)
    assert store.class_names == CROP_NAMES
    assert fx.splits(store) == {"train": [], "valid": [], "test": CROP_NAMES}
    assert store.class_sizes.tolist() == [3, 3, 2]
    fx.assert_colours(store, {name: 2 - i for i, name in enumerate(CROP_NAMES)})
    assert fx.heights(store, 0) == [10, 11, 12] and fx.heights(store, 2) == [10, 12]
    assert report.skipped[0][0] == str(bad) and len(report.skipped) == 1
    assert json.loads(report_path(out).read_text())["skipped"][0][0] == str(bad)
    settings = _settings(store)
    assert settings["tree"] == "partial" and settings["unused_entries"] == 1
    assert settings["protocol"].startswith("bscd-fsl")


def test_crop_disease_wrong_root_names_expected_layout(tmp_path) -> None:
    fx.class_folders(tmp_path / "train", CROP_NAMES, 1)  # dataset/ level missing
    with pytest.raises(LayoutError, match=r"(?s)dataset/train.*raw layout for crop_disease"):
        crop_disease.convert(tmp_path, tmp_path / "out.h5")
    with pytest.raises(LayoutError, match="needs --raw"):
        crop_disease.convert(None, tmp_path / "out.h5")


# -- EuroSAT ------------------------------------------------------------------------------------
def test_eurosat_every_class_fewer_images_converts_with_a_reported_warning(tmp_path) -> None:
    fx.eurosat(tmp_path / "raw")  # all 10 classes, 2 images each instead of 27,000 in all
    out = tmp_path / "eurosat.h5"
    report = eurosat.convert(tmp_path / "raw", out)
    assert DomainStore(out).num_images == 20
    written = json.loads(report_path(out).read_text())
    assert written["warnings"] == report.warnings
    assert any("20 vs 27000 images" in w for w in report.warnings)


def test_eurosat_full_tree_matching_counts_keeps_native_64px(tmp_path, monkeypatch) -> None:
    fx.eurosat(tmp_path / "raw")
    monkeypatch.setattr(eurosat, "EXPECTED", Expected(10, 20, (0, 0, 10)))
    eurosat.convert(tmp_path / "raw", tmp_path / "eurosat.h5")
    store = DomainStore(tmp_path / "eurosat.h5")
    assert store.class_names == fx.EUROSAT_NAMES
    assert store.classes_in_split("test").tolist() == list(range(10))
    assert {tuple(s) for s in store.shapes} == {(64, 64, 3)}
    assert _settings(store)["tree"] == "full"
    fx.assert_colours(store, {name: k for k, name in enumerate(fx.EUROSAT_NAMES)})


# -- ISIC ---------------------------------------------------------------------------------------
ISIC_ROWS = [(f"ISIC_{n:07d}", label) for n, label in
             [(24306, 1), (24307, 1), (24308, 0), (24309, 6), (24310, 2), (24311, 3),
              (24312, 4), (24313, 5), (24314, 0), (24315, 1)]]


@pytest.mark.parametrize("csv_in_folder", [True, False])
def test_isic_labels_from_one_hot_columns_missing_image_reported(tmp_path, csv_in_folder) -> None:
    raw = tmp_path / "raw"
    rows = list(reversed(ISIC_ROWS))  # the CSV order does not decide the image order
    fx.isic(raw, rows, missing=["ISIC_0024315"], csv_in_folder=csv_in_folder)
    out = tmp_path / "isic.h5"

    report = isic.convert(raw, out, settings=TOLERANT)

    store = DomainStore(out)
    assert store.class_names == fx.ISIC_COLUMNS
    assert store.classes_in_split("test").tolist() == list(range(7))
    assert store.class_sizes.tolist() == [2, 2, 1, 1, 1, 1, 1]  # NV lost its missing image
    fx.assert_colours(store, {name: k for k, name in enumerate(fx.ISIC_COLUMNS)})
    nv = fx.heights(store, 1)
    assert nv == sorted(nv)
    assert len(report.skipped) == 1
    name, reason = report.skipped[0]
    assert name.endswith("ISIC2018_Task3_Training_Input/ISIC_0024315.jpg")
    assert "FileNotFoundError" in reason
    assert store.skipped == [tuple(report.skipped[0])]


def test_isic_row_that_is_not_one_hot_is_an_error_naming_it(tmp_path) -> None:
    path = fx.isic(tmp_path, ISIC_ROWS[:7])
    lines = path.read_text().splitlines()
    lines[3] = "ISIC_0024308,1.0,0.0,0.0,0.0,1.0,0.0,0.0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"csv:4 \(image ISIC_0024308\): expected exactly one 1"):
        isic.convert(tmp_path, tmp_path / "isic.h5")


def test_isic_header_must_be_image_and_seven_labels(tmp_path) -> None:
    fx.isic(tmp_path, ISIC_ROWS[:7], header=("image_id", *fx.ISIC_COLUMNS))
    with pytest.raises(ValueError, match=r"header \['image_id'"):
        isic.convert(tmp_path, tmp_path / "isic.h5")


def test_isic_missing_ground_truth_lists_both_places(tmp_path) -> None:
    (tmp_path / "ISIC2018_Task3_Training_Input").mkdir()
    with pytest.raises(LayoutError, match="ISIC2018_Task3_Training_GroundTruth/ISIC2018"):
        isic.convert(tmp_path, tmp_path / "isic.h5")


# -- ChestX -------------------------------------------------------------------------------------
CHESTX_ROWS = [
    ("00000001_000.png", "Cardiomegaly", "images_001/images"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "images_001/images"),
    ("00000002_000.png", "No Finding", "images_001/images"),
    ("00000003_000.png", "Atelectasis", "images_001/images"),
    ("00000004_000.png", "Effusion", "images_002/images"),
    ("00000005_000.png", "Infiltration", "images_002/images"),
    ("00000005_001.png", "Infiltration", "images_003/images"),
    ("00000006_000.png", "Mass", "images_002/images"),
    ("00000007_000.png", "Nodule", "images_003/images"),
    ("00000008_000.png", "Pneumothorax", "images_003/images"),
    ("00000009_000.png", "Pneumonia", "images_003/images"),
    ("00000010_000.png", "Hernia", "images_003/images"),
    ("00000011_000.png", "Atelectasis|Effusion|Mass", "images_002/images"),
    ("00000012_000.png", "No Finding", "images_002/images"),
    ("00000013_000.png", "Atelectasis", None),  # listed, not on disk
]


def test_chestx_single_labels_from_spread_folders_drops_counted(tmp_path) -> None:
    raw = tmp_path / "raw"
    fx.chestx(raw, CHESTX_ROWS)
    # one RGBA copy of a grey X-ray, as in the NIH release: stored greyscale all the same
    fx.write_image(raw / "images_003/images/00000007_000.png", (fx.grey(5),) * 3 + (255,),
                   mode="RGBA")
    out = tmp_path / "chestx.h5"

    report = chestx.convert(raw, out, workers=2, settings=TOLERANT)

    store = DomainStore(out)
    assert store.class_names == fx.CHESTX_LABELS
    assert store.classes_in_split("test").tolist() == list(range(7))
    assert store.class_sizes.tolist() == [1, 1, 1, 2, 1, 1, 1]
    assert set(store.shapes[:, 2].tolist()) == {1}
    fx.assert_colours(store, {name: k for k, name in enumerate(fx.CHESTX_LABELS)})
    settings = _settings(store)
    assert settings["dropped_by_protocol"] == {"Hernia": 1, "No Finding": 2, "Pneumonia": 1,
                                               "multi-label": 2}
    assert settings["csv_rows"] == 15 and settings["tree"] == "partial"
    assert report.skipped == [("Missing(name='00000013_000.png')",
                               "FileNotFoundError: listed in Data_Entry_2017.csv but not found "
                               "under the raw root")]


def test_chestx_same_file_name_twice_names_both_paths(tmp_path) -> None:
    fx.chestx(tmp_path, CHESTX_ROWS[:4])
    shutil.copy(tmp_path / "images_001/images/00000003_000.png", tmp_path / "00000003_000.png")
    with pytest.raises(LayoutError, match=r"'00000003_000.png' occurs twice .*/00000003_000.png "
                                          r"and .*images_001/images/00000003_000.png"):
        chestx.convert(tmp_path, tmp_path / "chestx.h5")


def test_chestx_csv_without_finding_labels_column_is_an_error(tmp_path) -> None:
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Labels\n00000001_000.png,Mass\n")
    with pytest.raises(ValueError, match=r"missing columns \['Finding Labels'\]"):
        chestx.convert(tmp_path, tmp_path / "chestx.h5")
