"""The HDF5 domain store: one file per domain, written atomically, read through a validating reader.

Layout (format version 1, documented in docs/format.md):

    /image_bytes     (B,) uint8   encoded images (PNG or JPEG) back to back, grouped by class
    /image_offsets   (N+1,) int64 image i is image_bytes[offsets[i]:offsets[i+1]]
    /shapes          (N, 3) uint16 height, width, channels of each decoded image
    /checksums       (N,) uint32  CRC-32 of each encoded image
    /labels          (N,) int32   class id of each image (non-decreasing)
    /class_offsets   (C+1,) int64 images of class c are [offsets[c], offsets[c+1])
    /classes/names   (C,) str
    /classes/split   (C,) uint8   0 train, 1 valid, 2 test; contiguous train -> valid -> test
    /hierarchy/...   optional: two_level (superclasses) or dag (WordNet-like graph)
    /skipped/...     optional: files the converter could not read, with the reason
    attrs            format, format_version, complete, source, converter_version, settings, counts

Writes go to ``<out>.partial`` and are renamed only after everything (including the ``complete``
attribute) is on disk, so a killed conversion never leaves a file that passes as complete.
A conversion that stops part way keeps its ``.partial`` file: at class boundaries, at most every
``COMMIT_SECONDS``, the writer flushes and records how many classes and images are complete, and
a rerun with the same plan (source, converter version, classes and their item counts,
settings) reopens the file, drops whatever came after the last commit and goes on from there.
A partial file that cannot be opened, or that belongs to another plan, is started over.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from data_prep.files import fsync_file

log = logging.getLogger(__name__)

FORMAT_NAME = "amt-domain"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
_WRITE_CHUNK = 1024
_BYTE_CHUNK = 1 << 16
COMMIT_SECONDS = 30.0  # most work a stopped conversion loses (plus the class in progress)
_GROWING = ("shapes", "checksums", "labels")  # one row per image, appended while writing
_FINISHED = ("class_offsets", "classes", "hierarchy", "skipped")  # written by _finish only


class StoreError(ValueError):
    """A domain file is missing, truncated, unfinished, of another format, or inconsistent."""


class DamagedImageError(StoreError):
    """An image's stored bytes do not match their CRC-32, or do not decode."""


@dataclass(frozen=True)
class Hierarchy:
    """Superclass structure over the classes of a domain.

    ``two_level``: ``node_names`` are superclasses (scripts, alphabets) and ``class_parent[c]``
    is the superclass of class c. ``dag``: ``node_names`` are internal nodes of a graph whose
    leaves are the classes; ``edges`` rows are (parent node, child) where a child >= 0 is a node
    id and a child < 0 is class ``-child - 1``.
    """

    kind: str
    node_names: tuple[str, ...]
    class_parent: np.ndarray | None = None
    edges: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("two_level", "dag"):
            raise ValueError(f"hierarchy kind {self.kind!r}: expected 'two_level' or 'dag'")
        if self.kind == "two_level" and self.class_parent is None:
            raise ValueError("a two_level hierarchy needs class_parent")
        if self.kind == "dag" and self.edges is None:
            raise ValueError("a dag hierarchy needs edges")


def encode_image(image: np.ndarray | Image.Image, codec: str = "png", quality: int = 95) -> bytes:
    """Encode an HxW or HxWxC uint8 image (or a PIL image) as PNG or JPEG bytes."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("RGB")
    buffer = io.BytesIO()
    if codec == "png":
        pil.save(buffer, format="PNG", compress_level=6)
    elif codec == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        raise ValueError(f"codec {codec!r}: expected 'png' or 'jpeg'")
    return buffer.getvalue()


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Decode stored bytes to an HxWxC uint8 array (C is 1 for greyscale, else 3)."""
    with Image.open(io.BytesIO(bytes(data))) as pil:
        pil = pil if pil.mode in ("L", "RGB") else pil.convert("RGB")
        array = np.asarray(pil)
    return array[:, :, None] if array.ndim == 2 else array


class DomainWriter:
    """Context manager that writes one domain file atomically.

    Images must arrive grouped by class in increasing class id (the order of ``class_names``);
    ``close`` checks that every class received at least one image.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        source: str,
        converter_version: str,
        class_names: Sequence[str],
        class_splits: Sequence[str],
        settings: dict | None = None,
        hierarchy: Hierarchy | None = None,
        plan: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._check_classes(class_names, class_splits)
        self.class_names = list(class_names)
        self.class_splits = list(class_splits)
        self.source = source
        self.converter_version = converter_version
        self.settings = dict(settings or {})
        self.hierarchy = hierarchy
        self.fingerprint = _fingerprint(source, converter_version, self.class_names,
                                        self.class_splits, self.settings, plan)
        self._file: h5py.File | None = None
        self._pending: list[tuple[int, bytes, tuple[int, int, int]]] = []
        self._count = 0
        self._bytes = 0
        self._last_label = 0
        self._counts = np.zeros(len(self.class_names), dtype=np.int64)
        self._skipped: list[tuple[str, str]] = []
        self.resume_class = 0  # classes before it were complete in a previous run's commit
        self._committed_at = time.monotonic()

    def _check_classes(self, names: Sequence[str], splits: Sequence[str]) -> None:
        if len(names) != len(splits):
            raise ValueError(f"{self.path}: {len(names)} class names but {len(splits)} splits")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: class names are not unique")
        codes = [SPLITS.index(s) if s in SPLITS else -1 for s in splits]
        if -1 in codes:
            bad = splits[codes.index(-1)]
            raise ValueError(f"{self.path}: split {bad!r} is not one of {SPLITS}")
        if codes != sorted(codes):
            raise ValueError(f"{self.path}: class ids must run train -> valid -> test contiguously")

    def __enter__(self) -> DomainWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.partial.exists() and self._resume()):
            self._start()
        return self

    def _start(self) -> None:
        self.partial.unlink(missing_ok=True)
        self._file = f = h5py.File(self.partial, "w")
        f.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "complete": False, "fingerprint": self.fingerprint})
        f.create_dataset("image_bytes", (0,), maxshape=(None,), dtype=np.uint8,
                         chunks=(_BYTE_CHUNK,))
        f.create_dataset("image_offsets", data=np.zeros(1, np.int64), maxshape=(None,),
                         chunks=(_WRITE_CHUNK,))
        f.create_dataset("shapes", (0, 3), maxshape=(None, 3), dtype=np.uint16,
                         chunks=(_WRITE_CHUNK, 3))
        f.create_dataset("checksums", (0,), maxshape=(None,), dtype=np.uint32,
                         chunks=(_WRITE_CHUNK,))
        f.create_dataset("labels", (0,), maxshape=(None,), dtype=np.int32, chunks=(_WRITE_CHUNK,))

    def _resume(self) -> bool:
        """Reopen a previous run's partial file at its last commit; False: start over."""
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as err:
            log.warning("%s: unreadable (%s); starting over", self.partial, err)
            return False
        try:
            attrs = f.attrs
            if attrs.get("fingerprint") != self.fingerprint or "committed_images" not in attrs:
                log.warning("%s: from another conversion plan or never committed; starting "
                            "over", self.partial)
                f.close()
                return False
            images, classes = int(attrs["committed_images"]), int(attrs["committed_classes"])
            offsets = f["image_offsets"][:images + 1]
            labels = f["labels"][:images]
            for name in _GROWING:
                f[name].resize(images, axis=0)
            f["image_offsets"].resize(images + 1, axis=0)
            f["image_bytes"].resize(int(offsets[-1]), axis=0)
            for name in _FINISHED:  # a run that failed while finishing may have left some
                if name in f:
                    del f[name]
        except (OSError, KeyError, ValueError) as err:
            log.warning("%s: inconsistent (%s); starting over", self.partial, err)
            f.close()
            return False
        self._file, self._count, self._bytes = f, images, int(offsets[-1])
        self._counts[:classes] = np.bincount(labels, minlength=len(self._counts))[:classes]
        self._skipped = [tuple(pair) for pair in json.loads(attrs["committed_skipped"])]
        self.resume_class = self._last_label = classes
        log.info("%s: resuming after %d of %d classes (%d images already written)",
                 self.partial, classes, len(self.class_names), images)
        return True

    def _boundary(self, label: int) -> None:
        """Entering class ``label``: every class before it is complete, a commit point."""
        if label > self._last_label and \
                time.monotonic() - self._committed_at >= COMMIT_SECONDS:
            self._commit(label)

    def _commit(self, classes: int) -> None:
        self._flush()
        self._file.attrs.update({"committed_images": self._count, "committed_classes": classes,
                                 "committed_skipped": json.dumps(self._skipped)})
        self._file.flush()
        self._committed_at = time.monotonic()

    def add(self, label: int, data: bytes, shape: tuple[int, ...]) -> None:
        """Append one encoded image of class ``label`` whose decoded shape is ``shape``."""
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"{self.path}: label {label} outside [0, {len(self.class_names)})")
        if label < self._last_label:
            raise ValueError(f"{self.path}: label {label} after {self._last_label}; "
                             "images must be grouped by class in increasing order")
        height, width = shape[:2]
        channels = shape[2] if len(shape) == 3 else 1
        self._boundary(label)
        self._last_label = label
        self._counts[label] += 1
        self._pending.append((label, data, (height, width, channels)))
        if len(self._pending) >= _WRITE_CHUNK:
            self._flush()

    def skip(self, name: str, reason: str, label: int | None = None) -> None:
        """Record a raw file (of class ``label``) that could not be used; it is listed in the
        output, never hidden."""
        if label is not None:
            self._boundary(label)
            self._last_label = max(self._last_label, label)
        self._skipped.append((name, reason))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return list(self._skipped)

    def _flush(self) -> None:
        if not self._pending:
            return
        f = self._file
        start, n = self._count, len(self._pending)
        for name in _GROWING:
            f[name].resize(start + n, axis=0)
        blob = b"".join(data for _, data, _ in self._pending)
        f["image_bytes"].resize(self._bytes + len(blob), axis=0)
        f["image_bytes"][self._bytes:] = np.frombuffer(blob, dtype=np.uint8)
        ends = self._bytes + np.cumsum([len(data) for _, data, _ in self._pending])
        f["image_offsets"].resize(start + n + 1, axis=0)
        f["image_offsets"][start + 1:] = ends
        self._bytes = int(ends[-1])
        f["shapes"][start:] = np.array([s for _, _, s in self._pending], dtype=np.uint16)
        f["checksums"][start:] = np.array([zlib.crc32(d) for _, d, _ in self._pending],
                                          dtype=np.uint32)
        f["labels"][start:] = np.array([label for label, _, _ in self._pending], dtype=np.int32)
        self._count += n
        self._pending.clear()

    def _finish(self) -> None:
        self._flush()
        empty = [self.class_names[c] for c in np.flatnonzero(self._counts == 0)]
        if empty:
            shown = ", ".join(map(repr, empty[:10]))
            raise StoreError(f"{self.path}: {len(empty)} classes have no images: {shown}")
        f = self._file
        str_dtype = h5py.string_dtype()
        f.create_dataset("class_offsets", data=np.concatenate([[0], np.cumsum(self._counts)]))
        f.create_dataset("classes/names", data=np.array(self.class_names, dtype=object),
                         dtype=str_dtype)
        f.create_dataset("classes/split",
                         data=np.array([SPLITS.index(s) for s in self.class_splits], np.uint8))
        if self.hierarchy is not None:
            self._write_hierarchy(f.create_group("hierarchy"), str_dtype)
        if self._skipped:
            names, reasons = zip(*self._skipped, strict=True)
            f.create_dataset("skipped/names", data=np.array(names, dtype=object), dtype=str_dtype)
            f.create_dataset("skipped/reasons", data=np.array(reasons, dtype=object),
                             dtype=str_dtype)
        f.attrs.update({
            "source": self.source,
            "converter_version": self.converter_version,
            "settings": json.dumps(self.settings, sort_keys=True),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "num_images": self._count,
            "num_classes": len(self.class_names),
            "num_skipped": len(self._skipped),
            "split_classes": json.dumps({s: self.class_splits.count(s) for s in SPLITS}),
        })
        for key in ("committed_images", "committed_classes", "committed_skipped"):
            f.attrs.pop(key, None)  # bookkeeping of an unfinished file
        f.attrs["complete"] = True

    def _write_hierarchy(self, group: h5py.Group, str_dtype) -> None:
        h = self.hierarchy
        group.attrs["kind"] = h.kind
        group.create_dataset("node_names", data=np.array(h.node_names, dtype=object),
                             dtype=str_dtype)
        if h.kind == "two_level":
            parent = np.asarray(h.class_parent, dtype=np.int32)
            if parent.shape != (len(self.class_names),) or parent.min() < 0 or \
                    parent.max() >= len(h.node_names):
                raise StoreError(f"{self.path}: class_parent must give every class a superclass")
            group.create_dataset("class_parent", data=parent)
        else:
            group.create_dataset("edges", data=np.asarray(h.edges, dtype=np.int64).reshape(-1, 2))

    def __exit__(self, exc_type, exc, tb) -> None:
        finished = False
        try:
            if exc_type is None:
                self._finish()
                finished = True
        finally:
            committed = "committed_images" in self._file.attrs
            self._file.close()
            self._file = None
            if finished:
                fsync_file(self.partial)
                os.replace(self.partial, self.path)
            elif committed:
                log.warning("%s: kept; rerunning the conversion resumes from its last commit",
                            self.partial)
            else:
                self.partial.unlink()  # nothing committed: nothing worth keeping


def _fingerprint(source: str, version: str, names: list[str], splits: list[str], settings: dict,
                 plan: dict | None) -> str:
    """What a partial file must match to be resumed."""
    text = json.dumps([source, version, names, splits, settings, plan], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class DomainStore:
    """Validating, fork-safe reader of one domain file.

    Metadata is read once on construction; image bytes are read through a handle opened lazily
    in each process, so the store can be handed to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._bytes: h5py.Dataset | None = None
        self._pid: int | None = None
        with self._open() as f:
            self._load_metadata(f)

    def _open(self) -> h5py.File:
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (an unfinished conversion left a .partial file)" if partial.exists() else ""
            raise StoreError(f"{self.path}: no such domain file{hint}")
        try:
            return h5py.File(self.path, "r")
        except OSError as err:
            raise StoreError(f"{self.path}: not a readable HDF5 file (truncated or corrupt?): "
                             f"{err}") from err

    def _load_metadata(self, f: h5py.File) -> None:
        fmt, version = f.attrs.get("format"), f.attrs.get("format_version")
        if fmt != FORMAT_NAME:
            raise StoreError(f"{self.path}: format attribute is {fmt!r}, expected {FORMAT_NAME!r}")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: format version {version}, this reader reads "
                             f"{FORMAT_VERSION}; convert the source again")
        if not f.attrs.get("complete", False):
            raise StoreError(f"{self.path}: the file is marked incomplete (conversion unfinished)")
        required = ("image_bytes", "image_offsets", "shapes", "checksums", "labels",
                    "class_offsets", "classes/names", "classes/split")
        missing = [name for name in required if name not in f]
        if missing:
            raise StoreError(f"{self.path}: missing datasets {missing}")
        try:
            self.labels = f["labels"][:].astype(np.int64)
            self.image_offsets = f["image_offsets"][:]
            n_bytes = len(f["image_bytes"])
            self.shapes = f["shapes"][:]
            self.checksums = f["checksums"][:]
            self.class_offsets = f["class_offsets"][:].astype(np.int64)
            self.class_names = [s.decode() for s in f["classes/names"][:]]
            self.class_split_codes = f["classes/split"][:]
            self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
            self.hierarchy = _read_hierarchy(f["hierarchy"]) if "hierarchy" in f else None
            self.skipped = _read_skipped(f)
        except (OSError, KeyError) as err:
            raise StoreError(f"{self.path}: unreadable metadata (corrupt file?): {err}") from err
        self._check_consistency(n_bytes)

    def _check_consistency(self, n_bytes: int) -> None:
        n, c = self.attrs["num_images"], self.attrs["num_classes"]
        lengths = {"image_offsets": len(self.image_offsets) - 1, "labels": len(self.labels),
                   "shapes": len(self.shapes), "checksums": len(self.checksums)}
        if any(length != n for length in lengths.values()):
            raise StoreError(f"{self.path}: dataset lengths {lengths} disagree with num_images={n}")
        image_offsets = self.image_offsets
        if image_offsets[0] != 0 or image_offsets[-1] != n_bytes or \
                np.any(np.diff(image_offsets) <= 0):
            raise StoreError(f"{self.path}: image_offsets do not cover image_bytes "
                             f"({image_offsets[-1]} of {n_bytes} bytes)")
        if len(self.class_names) != c or len(self.class_offsets) != c + 1:
            raise StoreError(f"{self.path}: class tables disagree with num_classes={c}")
        offsets = self.class_offsets
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
            raise StoreError(f"{self.path}: class_offsets are not a partition of the images")
        if np.any(np.repeat(np.arange(c), np.diff(offsets)) != self.labels):
            raise StoreError(f"{self.path}: labels disagree with class_offsets")
        codes = self.class_split_codes
        if np.any(np.diff(codes.astype(int)) < 0) or codes.max(initial=0) > 2:
            raise StoreError(f"{self.path}: class splits are not contiguous train -> valid -> test")

    # -- metadata -------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_sizes(self) -> np.ndarray:
        return np.diff(self.class_offsets)

    def classes_in_split(self, split: str) -> np.ndarray:
        """Class ids of ``split`` ('train', 'valid', 'test' or 'all')."""
        if split == "all":
            return np.arange(self.num_classes)
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS + ('all',)}")
        return np.flatnonzero(self.class_split_codes == SPLITS.index(split))

    def images_of_class(self, label: int) -> np.ndarray:
        return np.arange(self.class_offsets[label], self.class_offsets[label + 1])

    # -- images ---------------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            self._handle = self._open()
            self._bytes = self._handle["image_bytes"]  # looking it up costs more than a read
            self._pid = os.getpid()
        return self._handle

    def read_bytes(self, index: int) -> bytes:
        start, stop = self.image_offsets[index], self.image_offsets[index + 1]
        self._file()
        return self._bytes[start:stop].tobytes()

    def read(self, index: int) -> np.ndarray:
        """Decoded image ``index`` as an HxWxC uint8 array (C is 1 or 3), its CRC-32 checked
        first (about 2 % of a read: 7 us of 340 us for a 38 KB JPEG; a damaged byte that still
        decodes would otherwise pass as other pixels)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"{self.path}: image {index} outside [0, {self.num_images})")
        data = self.read_bytes(index)
        crc = zlib.crc32(data)
        if crc != self.checksums[index]:
            raise DamagedImageError(
                f"{self._where(index)}: CRC-32 of its {len(data)} stored bytes is {crc:08x}, "
                f"expected {int(self.checksums[index]):08x}; the file is damaged (check it with "
                f"`python -m data_prep verify {self.path}`, convert the source again)")
        try:
            return decode_image(data)
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ...
            raise DamagedImageError(f"{self._where(index)}: cannot decode its stored bytes "
                                    f"({type(err).__name__}: {err})") from err

    def _where(self, index: int) -> str:
        """File, class and position of image ``index``, for error messages."""
        label = int(self.labels[index])
        within = index - int(self.class_offsets[label])
        return (f"{self.path}: image {index} (class {label} {self.class_names[label]!r}, "
                f"image {within} of the class)")

    def verify(self) -> list[str]:
        """Decode every image and check checksums and shapes; returns a list of problems."""
        problems: list[str] = []
        f = self._file()
        checksums = self.checksums
        offsets = self.image_offsets
        for start in range(0, self.num_images, _WRITE_CHUNK):
            stop = min(start + _WRITE_CHUNK, self.num_images)
            block = f["image_bytes"][offsets[start]:offsets[stop]].tobytes()
            for i in range(start, stop):
                data = block[offsets[i] - offsets[start]:offsets[i + 1] - offsets[start]]
                if zlib.crc32(data) != checksums[i]:
                    problems.append(f"image {i}: checksum mismatch")
                    continue
                try:
                    shape = decode_image(data).shape
                except Exception as err:  # any decoder failure is a problem to report
                    problems.append(f"image {i}: cannot decode ({err})")
                    continue
                if tuple(shape) != tuple(self.shapes[i]):
                    problems.append(f"image {i}: decoded shape {shape} != stored {self.shapes[i]}")
        return problems

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle, self._bytes = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_bytes"], state["_pid"] = None, None, None
        return state

    def summary(self) -> dict:
        """Counts and provenance for ``data_prep inspect``."""
        sizes = self.class_sizes
        splits = {}
        for split in SPLITS:
            ids = self.classes_in_split(split)
            split_sizes = sizes[ids]
            splits[split] = {
                "classes": int(len(ids)),
                "images": int(split_sizes.sum()),
                "images_per_class": _stats(split_sizes),
            }
        summary = {
            "file": str(self.path),
            "images": self.num_images,
            "classes": self.num_classes,
            "splits": splits,
            "image_height": _stats(self.shapes[:, 0]),
            "image_width": _stats(self.shapes[:, 1]),
            "channels": sorted({int(c) for c in np.unique(self.shapes[:, 2])}),
            "skipped": len(self.skipped),
            "provenance": {k: v for k, v in self.attrs.items() if k not in ("format", "complete")},
        }
        if self.hierarchy is not None:
            summary["hierarchy"] = {"kind": self.hierarchy.kind,
                                    "nodes": len(self.hierarchy.node_names)}
        return summary


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2),
            "max": int(values.max())}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_hierarchy(group: h5py.Group) -> Hierarchy:
    kind = group.attrs["kind"]
    names = tuple(s.decode() for s in group["node_names"][:])
    if kind == "two_level":
        return Hierarchy(kind, names, class_parent=group["class_parent"][:].astype(np.int64))
    return Hierarchy(kind, names, edges=group["edges"][:])


def finished_attrs(path: str | os.PathLike
                   ) -> tuple[dict, list[str], list[str], list[tuple[str, str]]]:
    """Attributes, class names, class splits and skipped files of a finished domain file, read
    without loading its per-image tables (to decide whether a conversion is up to date)."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) if k != "settings" else v for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT_NAME or not attrs.get("complete", False):
                raise StoreError(f"{path}: exists but is not a finished {FORMAT_NAME} file")
            names = [s.decode() for s in f["classes/names"][:]]
            splits = [SPLITS[code] for code in f["classes/split"][:]]
            return attrs, names, splits, _read_skipped(f)
    except (OSError, KeyError, IndexError) as err:
        raise StoreError(f"{path}: exists but is not a readable domain file ({err})") from err


def _read_skipped(f: h5py.File) -> list[tuple[str, str]]:
    if "skipped" not in f:
        return []
    names = [s.decode() for s in f["skipped/names"][:]]
    reasons = [s.decode() for s in f["skipped/reasons"][:]]
    return list(zip(names, reasons, strict=True))
