"""The HDF5 domain format: round trip, atomic writes, and refusal of broken files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from data_prep.convert import ClassSpec, StorageSettings, write_domain
from data_prep.store import (
    DomainStore,
    DomainWriter,
    Hierarchy,
    StoreError,
    decode_image,
    encode_image,
)


def test_round_trip_preserves_pixels_labels_splits_and_hierarchy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = {name: [rng.integers(0, 256, (9, 7, 3), dtype=np.uint8) for _ in range(n)]
              for name, n in [("cat", 3), ("dog", 2), ("car", 4)]}
    classes = [ClassSpec("cat", "train", images["cat"], "animal"),
               ClassSpec("dog", "valid", images["dog"], "animal"),
               ClassSpec("car", "test", images["car"], "vehicle")]
    out = tmp_path / "d.h5"
    report = write_domain(out, source="unit", converter_version="7", classes=classes,
                          load=np.asarray, extra_settings={"note": "x"})
    assert report.images == 9 and not report.skipped
    store = DomainStore(out)
    assert store.class_names == ["cat", "dog", "car"]
    assert store.classes_in_split("valid").tolist() == [1]
    assert store.class_sizes.tolist() == [3, 2, 4]
    assert store.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # RGB images are stored as JPEG by default ('auto'), so compare a lossless PNG file instead.
    png = tmp_path / "png.h5"
    from data_prep.convert import StorageSettings
    write_domain(png, source="unit", converter_version="7", classes=classes, load=np.asarray,
                 settings=StorageSettings(codec="png"))
    lossless = DomainStore(png)
    flat = images["cat"] + images["dog"] + images["car"]
    for i, expected in enumerate(flat):
        np.testing.assert_array_equal(lossless.read(i), expected)
    assert store.read(4).shape == (9, 7, 3)
    assert store.hierarchy.kind == "two_level"
    assert store.hierarchy.node_names == ("animal", "vehicle")
    assert store.hierarchy.class_parent.tolist() == [0, 0, 1]
    assert store.attrs["source"] == "unit" and store.attrs["converter_version"] == "7"
    assert store.attrs["settings"]["note"] == "x"
    assert store.verify() == []


def test_dag_hierarchy_round_trip(tmp_path: Path) -> None:
    edges = np.array([[0, 1], [0, -1], [1, -2], [1, -3]])
    out = tmp_path / "dag.h5"
    writer = DomainWriter(out, source="u", converter_version="1", class_names=["a", "b", "c"],
                          class_splits=["train", "train", "test"],
                          hierarchy=Hierarchy("dag", ("root", "inner"), edges=edges))
    data = encode_image(np.zeros((4, 4), np.uint8))
    with writer:
        for label in range(3):
            writer.add(label, data, (4, 4))
    store = DomainStore(out)
    np.testing.assert_array_equal(store.hierarchy.edges, edges)
    assert store.hierarchy.node_names == ("root", "inner")


def test_greyscale_png_is_lossless_and_keeps_one_channel() -> None:
    image = np.arange(48, dtype=np.uint8).reshape(6, 8)
    decoded = decode_image(encode_image(image, "png"))
    assert decoded.shape == (6, 8, 1)
    np.testing.assert_array_equal(decoded[:, :, 0], image)


def test_pmf_pixels_storage_squashes_large_images_losslessly(tmp_path: Path) -> None:
    """PMF's HDF5 pixels: an image whose sides are both >= 224 squashed to 224 x 224 (as
    torchvision's Resize((224, 224)) on a PIL image: bilinear), a smaller one as decoded;
    stored as PNG, both read back exactly."""
    rng = np.random.default_rng(4)
    large = rng.integers(0, 256, (250, 300, 3), dtype=np.uint8)
    narrow = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # one side < 224: kept
    out = tmp_path / "pmf.h5"
    write_domain(out, source="unit", converter_version="1",
                 classes=[ClassSpec("a", "test", [large, narrow])], load=np.asarray,
                 settings=StorageSettings(short_side=None, squash_side=224, codec="png"))
    store = DomainStore(out)
    squashed = np.asarray(Image.fromarray(large).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(store.read(0), squashed)
    np.testing.assert_array_equal(store.read(1), narrow)
    assert json.loads(h5py.File(out, "r").attrs["settings"])["squash_side"] == 224
    # unset, it is not recorded: files converted before the setting existed stay up to date
    assert "squash_side" not in StorageSettings().as_dict()
    with pytest.raises(ValueError, match="codec 'webp'"):
        StorageSettings(codec="webp")


def test_writer_rejects_classes_out_of_split_order(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train -> valid -> test"):
        DomainWriter(tmp_path / "x.h5", source="u", converter_version="1",
                     class_names=["a", "b"], class_splits=["test", "train"])


def test_writer_rejects_unknown_split_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'holdout'"):
        DomainWriter(tmp_path / "x.h5", source="u", converter_version="1",
                     class_names=["a"], class_splits=["holdout"])


def test_empty_class_fails_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    writer = DomainWriter(out, source="u", converter_version="1", class_names=["a", "b"],
                          class_splits=["test", "test"])
    with pytest.raises(StoreError, match="'b'"), writer:
        writer.add(0, encode_image(np.zeros((4, 4), np.uint8)), (4, 4))
    assert not out.exists() and not writer.partial.exists()


def test_unreadable_items_are_counted_and_reported(tmp_path: Path) -> None:
    good = [np.zeros((5, 5), np.uint8)] * 200
    classes = [ClassSpec("a", "test", [*good, "not an image"])]
    out = tmp_path / "x.h5"
    report = write_domain(out, source="u", converter_version="1", classes=classes,
                          load=np.asarray)
    assert report.images == 200 and len(report.skipped) == 1
    assert DomainStore(out).skipped[0][0] == "not an image"
    assert (tmp_path / "x.h5.report.json").exists()


def test_too_many_unreadable_items_fail_the_conversion(tmp_path: Path) -> None:
    classes = [ClassSpec("a", "test", [np.zeros((5, 5), np.uint8), "bad", "worse"])]
    with pytest.raises(StoreError, match="unreadable"):
        write_domain(tmp_path / "x.h5", source="u", converter_version="1", classes=classes,
                     load=np.asarray)
    assert not (tmp_path / "x.h5").exists()


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from data_prep.store import DomainWriter, encode_image
out = sys.argv[1]
data = encode_image(np.zeros((8, 8), np.uint8))
with DomainWriter(out, source="u", converter_version="1", class_names=["a"],
                  class_splits=["test"]) as writer:
    for _ in range(3000):
        writer.add(0, data, (8, 8))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leaves_no_file_that_passes_as_complete(tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)],
                            cwd=Path(__file__).parents[1], capture_output=True)
    assert result.returncode == -9
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()
    with pytest.raises(StoreError, match="unfinished conversion"):
        DomainStore(out)
    shutil.copy(partial, out)  # even renamed by hand, the file is refused
    with pytest.raises(StoreError, match=str(out)):
        DomainStore(out)


def test_truncated_file_is_refused_naming_the_file(tiny_domain: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(tiny_domain.read_bytes()[: tiny_domain.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated.h5"):
        DomainStore(truncated)


def test_other_format_version_is_refused(tiny_domain: Path) -> None:
    with h5py.File(tiny_domain, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        DomainStore(tiny_domain)


def test_incomplete_flag_is_refused(tiny_domain: Path) -> None:
    with h5py.File(tiny_domain, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        DomainStore(tiny_domain)


def test_inconsistent_tables_are_refused(tiny_domain: Path) -> None:
    with h5py.File(tiny_domain, "r+") as f:
        f["class_offsets"][1] = 0
    with pytest.raises(StoreError, match="class_offsets"):
        DomainStore(tiny_domain)


def test_verify_finds_corrupted_image_bytes(tiny_domain: Path, capsys) -> None:
    store = DomainStore(tiny_domain)
    start = int(store.image_offsets[5])
    with h5py.File(tiny_domain, "r+") as f:
        f["image_bytes"][start + 20] ^= 0xFF
    assert DomainStore(tiny_domain).verify() == ["image 5: checksum mismatch"]
    assert data_prep_main(["verify", str(tiny_domain)]) == 1
    assert "BROKEN" in capsys.readouterr().err


def test_store_reopens_its_handle_after_pickling(tiny_domain: Path) -> None:
    import pickle

    store = DomainStore(tiny_domain)
    first = store.read(0)
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read(0), first)


def test_inspect_cli_prints_counts(tiny_domain: Path, capsys) -> None:
    assert data_prep_main(["inspect", str(tiny_domain)]) == 0
    text = capsys.readouterr().out
    assert "36 images, 9 classes" in text
    assert "train:     4 classes        16 images" in text
    assert "two_level with 2 superclass nodes" in text
