"""The generic image_folder source: folder per class, optional split file."""

from __future__ import annotations

import json

import fixtures_cross_domain as fx
import pytest

from data_prep.convert import StorageSettings
from data_prep.sources import image_folder
from data_prep.sources.common import LayoutError
from data_prep.store import DomainStore

NAMES = ["black kite", "grey heron", "red fox", "white stork"]  # sorted, with spaces


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    fx.class_folders(root, NAMES, [2, 3, 1, 2])
    return root


def test_without_split_file_every_class_is_test(raw, tmp_path) -> None:
    (raw / "notes.txt").write_text("top-level file, not a class\n")
    (raw / "red fox/thumbs").mkdir()
    image_folder.convert(raw, tmp_path / "d.h5")
    store = DomainStore(tmp_path / "d.h5")
    assert fx.splits(store) == {"train": [], "valid": [], "test": NAMES}
    assert store.class_sizes.tolist() == [2, 3, 1, 2]
    fx.assert_colours(store, {name: k for k, name in enumerate(NAMES)})
    settings = store.attrs["settings"]
    assert settings["split_file"] is None and settings["unused_entries"] == 2


def _json_split(path):
    path.write_text(json.dumps({"test": ["grey heron"], "train": ["white stork", "black kite"],
                                "valid": ["red fox"]}))
    return path


def _csv_split(path):
    # with the byte-order mark spreadsheet programs write
    path.write_text("\ufeffclass,split\nred fox,valid\nwhite stork,train\ngrey heron,test\n"
                    "black kite,train\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("write", [_json_split, _csv_split])
def test_split_file_orders_train_valid_test_keeping_folder_order(raw, tmp_path, write) -> None:
    split_file = write(tmp_path / f"splits.{'json' if write is _json_split else 'csv'}")
    image_folder.convert(raw, tmp_path / "d.h5", split_file=split_file)
    store = DomainStore(tmp_path / "d.h5")
    assert fx.splits(store) == {"train": ["black kite", "white stork"], "valid": ["red fox"],
                                "test": ["grey heron"]}
    assert store.class_sizes.tolist() == [2, 2, 1, 3]
    fx.assert_colours(store, {name: k for k, name in enumerate(NAMES)})
    settings = store.attrs["settings"]
    assert settings["split_file"] == split_file.name and len(settings["split_file_sha256"]) == 64


def test_split_file_with_unknown_and_unlisted_classes_names_them(raw, tmp_path) -> None:
    split_file = tmp_path / "s.json"
    split_file.write_text(json.dumps({"train": ["black kite", "grey heron", "red  fox"],
                                      "test": ["white stork", "Red Fox"]}))
    with pytest.raises(ValueError, match=r"not class folders: \['Red Fox', 'red  fox'\]; "
                                         r"class folders it does not list: \['red fox'\]"):
        image_folder.convert(raw, tmp_path / "d.h5", split_file=split_file)


@pytest.mark.parametrize("text, message", [
    ("class,split\nred fox,val\n", r"class 'red fox' has split 'val'"),
    ("class,split\nred fox,test\nred fox,train\n", r"'red fox' is listed twice \('test' and"),
    ("name,split\nred fox,test\n", r"columns 'class' and 'split'"),
])
def test_malformed_csv_split_file_is_an_error(raw, tmp_path, text, message) -> None:
    split_file = tmp_path / "s.csv"
    split_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        image_folder.convert(raw, tmp_path / "d.h5", split_file=split_file)


def test_json_split_file_with_other_keys_or_wrong_suffix_is_an_error(raw, tmp_path) -> None:
    split_file = tmp_path / "s.json"
    split_file.write_text(json.dumps({"train": NAMES, "val": []}))
    with pytest.raises(ValueError, match="keys among"):
        image_folder.convert(raw, tmp_path / "d.h5", split_file=split_file)
    with pytest.raises(ValueError, match=r"must end in .json or .csv"):
        image_folder.convert(raw, tmp_path / "d.h5", split_file=tmp_path / "s.yaml")


def test_short_side_comes_from_settings(tmp_path) -> None:
    fx.class_folders(tmp_path / "raw", ["a", "b"], 1, size=48)
    image_folder.convert(tmp_path / "raw", tmp_path / "d.h5",
                         settings=StorageSettings(short_side=20))
    assert {tuple(s) for s in DomainStore(tmp_path / "d.h5").shapes} == {(20, 20, 3)}


def test_root_without_class_folders_is_a_layout_error(tmp_path) -> None:
    fx.write_image(tmp_path / "loose.jpg", (1, 2, 3))
    with pytest.raises(LayoutError, match="no class folders"):
        image_folder.convert(tmp_path, tmp_path / "d.h5")
