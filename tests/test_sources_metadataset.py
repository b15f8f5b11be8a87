"""Meta-Dataset converters: reference data, layouts, and class counts of full downloads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_metadataset import (
    cu_birds_tree,
    dtd_tree,
    full_tree,
    image_bytes,
    omniglot_spec_alphabets,
    omniglot_tree,
    traffic_sign_names,
)

from data_prep.convert import StorageSettings, report_path
from data_prep.sources import source_module
from data_prep.sources.common import LayoutError
from data_prep.sources.metadataset_common import (
    imagenet_duplicates,
    label_names,
    reference_spec,
    split_lists,
)
from data_prep.store import SPLITS, DomainStore

META_DATASET = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi",
                "vgg_flower", "traffic_sign", "mscoco")
SPLIT_LIST_SOURCES = ("aircraft", "cu_birds", "dtd", "fungi", "mscoco", "quickdraw",
                      "traffic_sign", "vgg_flower")
EXPECTED = {  # classes per split (train, valid, test), from Meta-Dataset's paper and specs
    "ilsvrc_2012": (712, 158, 130), "omniglot": (883, 81, 659), "aircraft": (70, 15, 15),
    "cu_birds": (140, 30, 30), "dtd": (33, 7, 7), "quickdraw": (241, 52, 52),
    "fungi": (994, 200, 200), "vgg_flower": (71, 15, 16), "traffic_sign": (0, 0, 43),
    "mscoco": (0, 40, 40)}


def convert(source: str, raw: Path, tmp: Path, **kwargs) -> DomainStore:
    out = tmp / f"{source}.h5"
    source_module(source).convert(raw, out, **kwargs)
    return DomainStore(out)


def split_counts(store: DomainStore) -> tuple[int, ...]:
    return tuple(len(store.classes_in_split(s)) for s in SPLITS)


# -- reference data -------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SPLIT_LIST_SOURCES)
def test_split_lists_follow_the_spec_class_order(source):
    lists = split_lists(source)
    spec = reference_spec(source)
    assert tuple(n for s in SPLITS for n in lists[s]) == spec.class_names
    assert tuple(len(lists[s]) for s in SPLITS) == EXPECTED[source]


@pytest.mark.parametrize("source", ["omniglot", "ilsvrc_2012"])
def test_structural_specs_give_the_expected_counts(source):
    spec = reference_spec(source)
    assert tuple(spec.split_counts[s] for s in SPLITS) == EXPECTED[source]
    assert len(spec.class_names) == sum(EXPECTED[source])


def test_label_files_and_duplicates():
    assert len(label_names("VggFlower_labels.txt")) == 102
    assert label_names("VggFlower_labels.txt")[0] == "pink primrose"
    assert traffic_sign_names()[14] == "14.Stop"
    duplicates = imagenet_duplicates()
    assert {"n01531178_12730.JPEG", "n04090263_2592.JPEG"} <= duplicates
    assert not any("/" in d or "#" in d or " " in d for d in duplicates)
    assert sum(reference_spec("ilsvrc_2012").images.values()) == 1_281_167 - len(duplicates)


# -- layouts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", META_DATASET)
def test_missing_raw_root_prints_the_layout(source, tmp_path):
    module = source_module(source)
    assert module.NEEDS_RAW and module.VERSION
    with pytest.raises(LayoutError) as missing:
        module.convert(None, tmp_path / "out.h5")
    assert module.LAYOUT in str(missing.value)
    with pytest.raises(LayoutError) as empty:
        module.convert(tmp_path, tmp_path / "out.h5")
    assert module.LAYOUT in str(empty.value) and str(tmp_path) in str(empty.value)
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(("source", "required"), [
    ("aircraft", "data/variants.txt"), ("fungi", "val.json"), ("omniglot", "images_evaluation"),
    ("ilsvrc_2012", "words.txt"), ("mscoco", "instances_train2017.json")])
def test_missing_required_file_prints_the_layout(source, required, tmp_path):
    raw = full_tree(source, tmp_path)
    target = raw / required
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(LayoutError) as missing:
        convert(source, raw, tmp_path)
    assert source_module(source).LAYOUT in str(missing.value)
    assert Path(required).name in str(missing.value)


def test_unknown_class_folder_is_named(tmp_path):
    raw = dtd_tree(tmp_path, {"braided": [image_bytes("JPEG")], "velvety": [image_bytes("JPEG")]})
    with pytest.raises(LayoutError, match="'velvety'"):
        convert("dtd", raw, tmp_path)


def test_class_folder_without_images_is_an_error(tmp_path):
    raw = cu_birds_tree(tmp_path, {"014.Indigo_Bunting": [image_bytes("JPEG")],
                                   "044.Frigatebird": []})
    with pytest.raises(ValueError, match="no images.*'044.Frigatebird'"):
        convert("cu_birds", raw, tmp_path)


# -- full and partial downloads -------------------------------------------------------------------
@pytest.mark.parametrize("source", META_DATASET)
def test_full_download_gives_meta_dataset_classes_and_ids(source, tmp_path, caplog):
    raw = full_tree(source, tmp_path / "raw")
    with caplog.at_level(logging.WARNING):
        store = convert(source, raw, tmp_path)
    spec = reference_spec(source)
    assert split_counts(store) == EXPECTED[source]
    assert store.class_names == list(spec.class_names)  # class ids agree with Meta-Dataset
    assert store.num_images >= len(spec.class_names) and not store.skipped
    settings = store.attrs["settings"]
    assert settings["download"] == "full" and settings["missing_classes"] == 0
    assert settings["classes_per_split"] == dict(zip(SPLITS, EXPECTED[source], strict=True))
    assert "partial download" not in caplog.text
    # one or two images per class instead of the real counts: reported, not fatal
    assert "other image counts than Meta-Dataset's spec" in caplog.text
    report = json.loads(report_path(tmp_path / f"{source}.h5").read_text())
    assert any("other image counts than Meta-Dataset's spec" in w for w in report["warnings"])


def test_full_omniglot_keeps_alphabets_as_superclasses(tmp_path):
    store = convert("omniglot", full_tree("omniglot", tmp_path / "raw"), tmp_path)
    hierarchy = store.hierarchy
    assert hierarchy.kind == "two_level" and len(hierarchy.node_names) == 50
    valid = store.classes_in_split("valid")
    valid_alphabets = [hierarchy.node_names[p] for p in dict.fromkeys(
        hierarchy.class_parent[valid])]
    assert valid_alphabets == list(source_module("omniglot").VALID_ALPHABETS)
    for c in (0, 500, 1600):
        alphabet = hierarchy.node_names[hierarchy.class_parent[c]]
        assert store.class_names[c].startswith(alphabet + "-")


def test_partial_download_converts_and_warns(tmp_path, caplog):
    jpeg = image_bytes("JPEG")
    raw = dtd_tree(tmp_path, {"waffled": [jpeg, jpeg], "grid": [jpeg], "woven": [jpeg]})
    with caplog.at_level(logging.WARNING):
        store = convert("dtd", raw, tmp_path)
    assert store.class_names == ["waffled", "grid", "woven"]  # split-list order
    assert split_counts(store) == (1, 1, 1)
    assert "44 of 47 Meta-Dataset classes are missing (train 32/33, valid 6/7, test 6/7)" \
        in caplog.text
    assert store.attrs["settings"]["download"] == "partial"
    assert store.attrs["settings"]["missing_classes"] == 44
    assert store.attrs["settings"]["excluded_files"] == [".directory"]
    assert store.num_images == 4 and not store.skipped  # .directory left out, not reported


def test_full_download_with_an_extra_class_disagrees_with_the_spec(tmp_path):
    background, evaluation = omniglot_spec_alphabets()
    evaluation["ULOG"]["character27"] = 1
    raw = omniglot_tree(tmp_path, background, evaluation)
    with pytest.raises(ValueError, match="instead of.*'ULOG-character27'"):
        convert("omniglot", raw, tmp_path)


def test_stray_file_is_reported_not_dropped(tmp_path):
    jpeg = image_bytes("JPEG")
    raw = cu_birds_tree(tmp_path, {"014.Indigo_Bunting": [jpeg] * 60,
                                   "044.Frigatebird": [jpeg] * 40})
    (raw / "images" / "044.Frigatebird" / "Thumbs.db").write_bytes(b"\0" * 64)
    (raw / "images" / "014.Indigo_Bunting" / "014_0003.jpg").write_bytes(jpeg[:40])  # truncated
    out = tmp_path / "cub.h5"
    report = source_module("cu_birds").convert(
        raw, out, workers=2, settings=StorageSettings(max_bad_fraction=0.05))
    store = DomainStore(out)
    assert report.images == 99 and store.num_images == 99
    skipped = sorted(Path(name).name for name, _ in store.skipped)
    assert skipped == ["014_0003.jpg", "Thumbs.db"]
    assert json.loads(Path(f"{out}.report.json").read_text())["images"] == 99
    assert store.class_sizes.tolist() == [59, 40]
    assert np.all(store.shapes[:, 2] == 3)
