"""Fine-grained sources of Tseng et al. 2020: CUB, Cars, Places, Plantae."""

from __future__ import annotations

import json
import os

import fixtures_cross_domain as fx
import pytest
import scipy.io

from data_prep.convert import StorageSettings
from data_prep.sources import cars, cross_domain_common, cub, places, plantae
from data_prep.sources.common import LayoutError
from data_prep.sources.cross_domain_common import Expected, tseng_split
from data_prep.store import DomainStore

TOLERANT = StorageSettings(max_bad_fraction=0.5)


def test_tseng_split_rule_on_sixteen_indices() -> None:
    got = [tseng_split(i) for i in range(16)]
    assert [i for i, s in enumerate(got) if s == "train"] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [i for i, s in enumerate(got) if s == "valid"] == [1, 5, 9, 13]
    assert [i for i, s in enumerate(got) if s == "test"] == [3, 7, 11, 15]


# -- CUB ----------------------------------------------------------------------------------------
def test_cub_sixteen_classes_split_by_index_and_listed_train_valid_test(tmp_path) -> None:
    fx.cub(tmp_path / "raw", num_classes=16, per_class=2)
    cub.convert(tmp_path / "raw", tmp_path / "cub.h5")

    store = DomainStore(tmp_path / "cub.h5")
    names = fx.CUB_NAMES
    order = [0, 2, 4, 6, 8, 10, 12, 14, 1, 5, 9, 13, 3, 7, 11, 15]
    assert fx.splits(store) == {"train": [names[i] for i in order[:8]],
                                "valid": [names[i] for i in order[8:12]],
                                "test": [names[i] for i in order[12:]]}
    assert store.attrs["settings"]["original_index"] == order
    assert store.class_sizes.tolist() == [2] * 16
    fx.assert_colours(store, {name: k for k, name in enumerate(names)})
    assert store.attrs["settings"]["unused_entries"] == 0  # classes.txt is beside images/


# -- Cars ---------------------------------------------------------------------------------------
CARS_ANNOTATIONS = [("00007.jpg", 3), ("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 3),
                    ("00004.jpg", 4), ("00005.jpg", 5), ("00006.jpg", 6), ("00008.jpg", 7),
                    ("00009.jpg", 8), ("00010.jpg", 1), ("00011.jpg", 4)]


def test_cars_class_is_label_minus_one_names_from_meta(tmp_path) -> None:
    raw = tmp_path / "raw"
    fx.cars(raw, fx.CAR_NAMES, CARS_ANNOTATIONS, missing=["00011.jpg"])
    report = cars.convert(raw, tmp_path / "cars.h5", workers=2, settings=TOLERANT)

    store = DomainStore(tmp_path / "cars.h5")
    order = [0, 2, 4, 6, 1, 5, 3, 7]
    assert store.class_names == [fx.CAR_NAMES[i] for i in order]
    assert fx.splits(store)["test"] == [fx.CAR_NAMES[3], fx.CAR_NAMES[7]]
    # label 1 -> class 0 (2 images), label 3 -> class 2 (2), label 4 lost its missing file
    sizes = dict(zip(store.class_names, store.class_sizes.tolist(), strict=True))
    assert sizes == {fx.CAR_NAMES[0]: 2, fx.CAR_NAMES[1]: 1, fx.CAR_NAMES[2]: 2,
                     fx.CAR_NAMES[3]: 1, fx.CAR_NAMES[4]: 1, fx.CAR_NAMES[5]: 1,
                     fx.CAR_NAMES[6]: 1, fx.CAR_NAMES[7]: 1}
    fx.assert_colours(store, {name: k for k, name in enumerate(fx.CAR_NAMES)})
    assert [name.endswith("cars_train/00011.jpg") for name, _ in report.skipped] == [True]
    assert store.attrs["settings"]["crop"].startswith("none")


def test_cars_label_outside_meta_classes_names_the_file(tmp_path) -> None:
    fx.cars(tmp_path, fx.CAR_NAMES[:2], [("00001.jpg", 1), ("00002.jpg", 3)])
    with pytest.raises(ValueError, match=r"00002.jpg has label 3, expected 1..2"):
        cars.convert(tmp_path, tmp_path / "cars.h5")


def test_cars_annotations_without_fname_field_is_an_error(tmp_path) -> None:
    fx.cars(tmp_path, fx.CAR_NAMES[:1], [("00001.jpg", 1)])
    scipy.io.savemat(tmp_path / "devkit/cars_train_annos.mat", {"annotations": {"class": 1}})
    with pytest.raises(ValueError, match="needs fields 'class' and 'fname'"):
        cars.convert(tmp_path, tmp_path / "cars.h5")


# -- Places -------------------------------------------------------------------------------------
def test_places_keeps_first_files_by_sorted_name(tmp_path, monkeypatch) -> None:
    names = ["airfield", "alley", "amusement_park", "apartment_building-outdoor"]
    fx.places(tmp_path / "raw", names, per_class=5)
    monkeypatch.setattr(places, "PER_CLASS", 3)
    places.convert(tmp_path / "raw", tmp_path / "places.h5")

    store = DomainStore(tmp_path / "places.h5")
    assert store.class_names == ["airfield", "amusement_park", "alley",
                                 "apartment_building-outdoor"]
    assert [fx.heights(store, c) for c in range(4)] == [[10, 11, 12]] * 4
    settings = store.attrs["settings"]
    assert settings["per_class_limit"] == 3 and settings["files_beyond_limit"] == 8


# -- Plantae ------------------------------------------------------------------------------------
PLANT_COUNTS = {"Acer rubrum": 5, "Quercus alba": 7, "Bellis perennis": 3, "Zea mays": 7,
                "Rosa canina": 1, "Aloe vera": 4}
# top 4 by count (ties by name), then ascending count: Aloe 4, Acer 5, Quercus 7, Zea 7
PLANT_ORDER = ["Aloe vera", "Acer rubrum", "Quercus alba", "Zea mays"]


@pytest.fixture
def small_plantae(monkeypatch):
    monkeypatch.setattr(plantae, "NUM_SPECIES", 4)
    monkeypatch.setattr(plantae, "MAX_IMAGES", 5)
    monkeypatch.setattr(plantae, "EXPECTED", Expected(classes=4, images=None, splits=(2, 1, 1)))


def test_plantae_selects_top_species_orders_by_count_and_caps(tmp_path, small_plantae) -> None:
    fx.plantae(tmp_path / "raw", PLANT_COUNTS)
    out = tmp_path / "plantae.h5"
    plantae.convert(tmp_path / "raw", out)

    store = DomainStore(out)
    assert fx.splits(store) == {"train": ["Aloe vera", "Quercus alba"],
                                "valid": ["Acer rubrum"], "test": ["Zea mays"]}
    assert store.class_sizes.tolist() == [4, 5, 5, 5]
    assert fx.heights(store, 1) == [10, 11, 12, 13, 14]  # first 5 of Quercus' 7 by name
    fx.assert_colours(store, {name: k for k, name in enumerate(PLANT_COUNTS)})
    lists = json.loads(plantae.lists_path(out).read_text())
    assert [c["name"] for c in lists["classes"]] == PLANT_ORDER
    assert lists["classes"][2]["files"][0] == "Quercus alba/img_000.jpg"
    assert store.attrs["settings"]["tree"] == "full"


def test_plantae_lists_do_not_depend_on_listing_order(tmp_path, small_plantae,
                                                      monkeypatch) -> None:
    fx.plantae(tmp_path / "raw", PLANT_COUNTS)
    plantae.convert(tmp_path / "raw", tmp_path / "a.h5")

    real_scandir = os.scandir

    class Reversed:  # os.scandir handing out the entries in reverse order
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = list(entries)[::-1]

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cross_domain_common.os, "scandir", Reversed)
    plantae.convert(tmp_path / "raw", tmp_path / "b.h5")
    assert plantae.lists_path(tmp_path / "a.h5").read_bytes() == \
        plantae.lists_path(tmp_path / "b.h5").read_bytes()


def test_plantae_rerun_reuses_lists_and_missing_listed_file_is_an_error(
        tmp_path, small_plantae) -> None:
    raw = tmp_path / "raw"
    fx.plantae(raw, PLANT_COUNTS)
    out = tmp_path / "plantae.h5"
    plantae.convert(raw, out)
    lists = plantae.lists_path(out).read_bytes()

    fx.class_folders(raw / "train_val_images/Plantae", ["Rosa canina"], 9)  # now the largest
    plantae.convert(raw, out)
    assert DomainStore(out).class_names == ["Aloe vera", "Quercus alba", "Acer rubrum",
                                            "Zea mays"]
    assert plantae.lists_path(out).read_bytes() == lists

    (raw / "train_val_images/Plantae/Zea mays/img_002.jpg").unlink()
    with pytest.raises(LayoutError, match=r"1 files listed in .*plantae_lists.json are missing, "
                                          r"e.g. \['.*Zea mays/img_002.jpg'\]"):
        plantae.convert(raw, out)


def test_plantae_accepts_tsengs_plantae_folder(tmp_path, small_plantae) -> None:
    fx.plantae(tmp_path / "raw", PLANT_COUNTS, prefix="Plantae")
    plantae.convert(tmp_path / "raw", tmp_path / "plantae.h5")
    assert DomainStore(tmp_path / "plantae.h5").class_names[0] == "Aloe vera"


def test_plantae_partial_tree_is_recorded(tmp_path) -> None:
    fx.plantae(tmp_path / "raw", PLANT_COUNTS)
    plantae.convert(tmp_path / "raw", tmp_path / "plantae.h5")
    store = DomainStore(tmp_path / "plantae.h5")
    assert store.attrs["settings"]["tree"] == "partial"
    assert store.num_classes == 6
