"""Bad or unusual raw inputs and damaged files: each gets the message that names what is wrong."""

from __future__ import annotations

import json
import os
import zlib

import fixtures_cross_domain as fx
import h5py
import numpy as np
import pytest
from fixtures_metadataset import quickdraw_tree, vgg_flower_tree

from data_prep.__main__ import main as data_prep_main
from data_prep.convert import ClassSpec, StorageSettings, report_path, write_domain
from data_prep.sources import chestx, cu_birds, cub, plantae, quickdraw, vgg_flower
from data_prep.sources.metadataset_common import reference_spec
from data_prep.store import DamagedImageError, DomainStore, StoreError


def _tiny(out, short_side=160):
    rng = np.random.default_rng(0)
    classes = [ClassSpec(name, "test", [rng.integers(0, 256, (12, 9, 3), np.uint8)] * 4)
               for name in ("a", "b")]
    return write_domain(out, source="unit", converter_version="1", classes=classes,
                        load=np.asarray, settings=StorageSettings(short_side=short_side))


def _damage(path, index, data=None):
    """Flip a byte of image ``index`` (or replace its bytes, keeping a matching CRC)."""
    with h5py.File(path, "r+") as f:
        start, stop = f["image_offsets"][index], f["image_offsets"][index + 1]
        if data is None:
            f["image_bytes"][start + 20] ^= 0xFF
        else:
            data = data[:stop - start].ljust(stop - start, b"\0")
            f["image_bytes"][start:stop] = np.frombuffer(data, np.uint8)
            f["checksums"][index] = zlib.crc32(data)


# -- (bad input, the message it must get) -------------------------------------------------------
def _flipped(tmp_path):
    _tiny(tmp_path / "d.h5")
    _damage(tmp_path / "d.h5", 5)
    DomainStore(tmp_path / "d.h5").read(5)


def _undecodable(tmp_path):
    _tiny(tmp_path / "d.h5")
    _damage(tmp_path / "d.h5", 2, b"not an image at all")
    DomainStore(tmp_path / "d.h5").read(2)


def _changed_settings(tmp_path):
    _tiny(tmp_path / "d.h5")
    _tiny(tmp_path / "d.h5", short_side=96)


def _only_file_unreadable(tmp_path):
    fx.class_folders(tmp_path / "raw/dataset/train", ["A", "B"], 2)
    for name in ("img_000.jpg", "img_001.jpg"):
        fx.write_corrupt(tmp_path / "raw/dataset/train/B" / name)
    from data_prep.sources import crop_disease
    crop_disease.convert(tmp_path / "raw", tmp_path / "c.h5",
                         settings=StorageSettings(max_bad_fraction=0.9))


CASES = [
    (_flipped, DamagedImageError, r"d\.h5: image 5 \(class 1 'b', image 1 of the class\): "
                                  r"CRC-32 of its \d+ stored bytes is [0-9a-f]{8}, expected"),
    (_undecodable, DamagedImageError, r"d\.h5: image 2 \(class 0 'a', image 2 of the class\): "
                                      r"cannot decode"),
    (_changed_settings, ValueError, r"d\.h5 exists and was converted with other settings.*"
                                    r"settings\.short_side: 160 -> 96.*--force"),
    (_only_file_unreadable, StoreError, r"1 classes have no readable image.*'B': .*B/img_000"
                                        r"\.jpg, .*B/img_001\.jpg"),
]


@pytest.mark.parametrize(("make", "error", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_gets_a_message_naming_it(tmp_path, make, error, message) -> None:
    with pytest.raises(error, match=message):
        make(tmp_path)


def test_unreadable_only_file_still_writes_the_report(tmp_path) -> None:
    with pytest.raises(StoreError):
        _only_file_unreadable(tmp_path)
    report = json.loads(report_path(tmp_path / "c.h5").read_text())
    assert "no readable image" in report["error"]
    assert {name.rsplit("/", 2)[-2] for name, _ in report["skipped"]} == {"B"}


def test_rerun_is_up_to_date_and_leaves_the_file_alone(tmp_path, capsys) -> None:
    out = tmp_path / "d.h5"
    _tiny(out)
    before, mtime = out.read_bytes(), os.stat(out).st_mtime_ns
    assert _tiny(out).up_to_date
    assert out.read_bytes() == before and os.stat(out).st_mtime_ns == mtime


def test_cli_force_rebuilds_and_out_folder_is_an_early_error(tmp_path, capsys) -> None:
    out = tmp_path / "digits.h5"
    assert data_prep_main(["convert", "digits", "--out", str(out)]) == 0
    mtime = os.stat(out).st_mtime_ns
    assert data_prep_main(["convert", "digits", "--out", str(out)]) == 0
    assert "is up to date" in capsys.readouterr().out and os.stat(out).st_mtime_ns == mtime
    assert data_prep_main(["convert", "digits", "--out", str(out), "--short-side", "4"]) == 1
    assert "settings.short_side: null -> 4" in capsys.readouterr().err
    assert data_prep_main(["convert", "digits", "--out", str(out), "--short-side", "4",
                           "--force"]) == 0
    assert DomainStore(out).attrs["settings"]["short_side"] == 4
    assert data_prep_main(["convert", "digits", "--out", str(tmp_path)]) == 1
    assert "is an existing folder" in capsys.readouterr().err


# -- layouts a user meets -----------------------------------------------------------------------
def test_chestx_reads_the_v2020_csv(tmp_path) -> None:
    fx.chestx(tmp_path, [(f"0000000{k}_000.png", label, "images_001/images")
                         for k, label in enumerate(fx.CHESTX_LABELS)])
    os.rename(tmp_path / "Data_Entry_2017.csv", tmp_path / "Data_Entry_2017_v2020.csv")
    chestx.convert(tmp_path, tmp_path / "x.h5")
    assert DomainStore(tmp_path / "x.h5").attrs["settings"]["csv_file"] == \
        "Data_Entry_2017_v2020.csv"


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "CUB_200_2011"])
def test_cub_accepts_the_roots_cu_birds_accepts(tmp_path, inside) -> None:
    names = list(reference_spec("cu_birds").class_names[:4])
    fx.class_folders(tmp_path / "CUB_200_2011/images", names, 1)
    raw = tmp_path / "CUB_200_2011" if inside else tmp_path
    cub.convert(raw, tmp_path / "cub.h5")
    cu_birds.convert(raw, tmp_path / "cu_birds.h5")
    assert DomainStore(tmp_path / "cub.h5").num_classes == 4


def test_quickdraw_and_vgg_flower_accept_the_parent_folder(tmp_path) -> None:
    quickdraw_tree(tmp_path / "q", {"cat": np.zeros((2, 784), np.uint8)})
    quickdraw.convert(tmp_path / "q", tmp_path / "q.h5")
    vgg_flower_tree(tmp_path / "f", [1, 1, 2])
    vgg_flower.convert(tmp_path / "f", tmp_path / "f.h5")
    assert DomainStore(tmp_path / "q.h5").class_names == ["cat"]
    assert DomainStore(tmp_path / "f.h5").num_images == 3


def test_plantae_empty_species_folder_is_named_in_the_report(tmp_path) -> None:
    fx.plantae(tmp_path / "raw", {"Acer rubrum": 2, "Zea mays": 1})
    (tmp_path / "raw/train_val_images/Plantae/Empty one").mkdir()
    report = plantae.convert(tmp_path / "raw", tmp_path / "p.h5")
    assert any("Plantae/Empty one" in w for w in report.warnings)
    assert any("Empty one" in w for w in
               json.loads(report_path(tmp_path / "p.h5").read_text())["warnings"])
