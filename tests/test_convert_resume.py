"""A stopped conversion keeps its committed classes and a rerun goes on from there."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep import store
from data_prep.convert import ClassSpec, StorageSettings, report_path, write_domain
from data_prep.store import DomainStore

PER_CLASS = 5
LOADED: list[int] = []
STOP_AT: set[int] = set()
BROKEN = {7}  # an unreadable raw item in class 1, before the stop


def load(item: int) -> np.ndarray:
    if item in STOP_AT:
        raise KeyboardInterrupt(f"stopped at item {item}")  # like Ctrl-C or a killed job
    if item in BROKEN:
        raise OSError("truncated file")
    LOADED.append(item)
    rng = np.random.default_rng(item)
    return rng.integers(0, 256, (12, 10), dtype=np.uint8)


def classes(n: int = 6) -> list[ClassSpec]:
    splits = ["train"] * (n - 2) + ["valid", "test"]
    return [ClassSpec(f"class {c}", splits[c], list(range(c * PER_CLASS, (c + 1) * PER_CLASS)))
            for c in range(n)]


def convert(out: Path, specs: list[ClassSpec] | None = None):
    return write_domain(out, source="test", converter_version="1", classes=specs or classes(),
                        load=load, settings=StorageSettings(max_bad_fraction=0.1), workers=1)


@pytest.fixture(autouse=True)
def commit_at_every_class(monkeypatch):
    monkeypatch.setattr(store, "COMMIT_SECONDS", 0.0)
    LOADED.clear()
    STOP_AT.clear()


def contents(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        data = {name: f[name][()] for name in ("image_bytes", "image_offsets", "shapes",
                                               "checksums", "labels", "class_offsets",
                                               "skipped/names", "skipped/reasons")}
        data["attrs"] = {k: v for k, v in f.attrs.items() if k != "created"}
    return data


def test_stopped_conversion_resumes_and_ends_identical(tmp_path):
    STOP_AT.add(3 * PER_CLASS + 2)  # inside class 3
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        convert(out)
    partial = out.with_name(out.name + ".partial")
    assert partial.exists() and not out.exists()  # nothing that passes as complete

    STOP_AT.clear()
    LOADED.clear()
    report = convert(out)
    assert report.resumed_after_classes == 3  # classes 0-2 were committed on entering 3
    assert min(LOADED) == 3 * PER_CLASS  # nothing before class 3 was read again
    assert not partial.exists()

    whole = tmp_path / "whole.h5"
    fresh = convert(whole)
    assert fresh.resumed_after_classes == 0
    resumed, expected = contents(out), contents(whole)
    for name, value in expected.items():
        if name != "attrs":
            assert np.array_equal(resumed[name], value), name
    assert resumed["attrs"] == expected["attrs"]
    assert not {"committed_images", "committed_classes"} & set(resumed["attrs"])
    assert report.skipped == fresh.skipped == [("7", "OSError: truncated file")]
    assert json.loads(report_path(out).read_text())["resumed_after_classes"] == 3
    assert DomainStore(out).verify() == []


def test_partial_file_of_another_plan_is_started_over(tmp_path):
    STOP_AT.add(3 * PER_CLASS)
    out = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt):
        convert(out)
    STOP_AT.clear()
    other = classes()
    other[4].items.append(999)  # the raw data changed between the runs
    report = convert(out, other)
    assert report.resumed_after_classes == 0
    assert DomainStore(out).class_sizes.tolist() == [5, 4, 5, 5, 6, 5]  # item 7 is unreadable


def test_unreadable_partial_file_is_started_over(tmp_path):
    out = tmp_path / "d.h5"
    out.with_name(out.name + ".partial").write_bytes(b"not an HDF5 file")
    report = convert(out)
    assert report.resumed_after_classes == 0 and DomainStore(out).num_images == 29


def test_stop_before_any_commit_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "COMMIT_SECONDS", 3600.0)
    STOP_AT.add(12)
    out = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt):
        convert(out)
    assert list(tmp_path.iterdir()) == []
