"""The conversion engine every source module uses: load, resize, encode in parallel, write.

A source module only says which classes exist (in split order), which raw items belong to each,
and how to load one item; this module does the rest the same way for every source: resizing to
the storage resolution, choosing the codec, parallel encoding with progress, counting unreadable
items, failing when too many are bad, and writing the HDF5 file plus a JSON report beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.store import (
    SPLITS,
    DomainWriter,
    Hierarchy,
    StoreError,
    encode_image,
    finished_attrs,
)

log = logging.getLogger(__name__)

Loader = Callable[[Any], "Image.Image | np.ndarray"]
WARNINGS = "warnings"  # key of a provenance record: messages for the report, not the settings
_CHUNK = 64  # items per task sent to a worker process
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
_IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: keeps workers busy, memory bounded


@dataclass
class ClassSpec:
    """One class of a domain: its name, split, raw items and optional superclass."""

    name: str
    split: str
    items: Sequence[Any]
    superclass: str | None = None


CODECS = ("auto", "png", "jpeg")  # auto: PNG for greyscale, JPEG for colour


@dataclass
class StorageSettings:
    """How images are stored; part of each file's provenance.

    PMF's pixels (its HDF5 files, PMF: scripts/convert_tfrecord_to_h5.py:47-69): the decoded
    image squashed to 224 x 224 when both sides are at least 224, else as decoded, stored
    losslessly: ``short_side=None, squash_side=224, codec='png'``."""

    short_side: int | None = 160  # resize so the shorter side is at most this; None keeps native
    codec: str = "auto"  # one of CODECS
    jpeg_quality: int = 95
    max_bad_fraction: float = 0.01  # fail when more than this fraction of items is unreadable
    squash_side: int | None = None  # squash to this square when both sides are at least this

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r}: expected one of {list(CODECS)}")

    def as_dict(self) -> dict:
        """The settings as recorded; squash_side only when set, so files converted before it
        existed stay up to date."""
        return {k: v for k, v in self.__dict__.items()
                if k != "squash_side" or v is not None}


@dataclass
class ConversionReport:
    source: str
    output: str
    images: int = 0
    classes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged, and kept here
    seconds: float = 0.0  # this run's; a resumed run does not count the earlier ones
    resumed_after_classes: int = 0  # classes a previous run's partial file already held
    error: str | None = None  # why the conversion failed; no domain file then
    up_to_date: bool = field(default=False, compare=False)  # this run found the file done

    def write(self, path: Path) -> None:
        document = {k: v for k, v in self.__dict__.items() if k != "up_to_date"}
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, path)


class OutputError(ValueError):
    """The output path is a folder, or holds a finished file of another conversion."""


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")


def check_output(out: Path) -> None:
    """Fail before any work when ``out`` cannot become a domain file."""
    if out.is_dir():
        raise OutputError(f"--out {out} is an existing folder; it must name the domain file to "
                          f"write, e.g. {out / 'domain.h5'}")


def warning(source: str, message: str) -> dict:
    """Log a conversion warning and return it as a provenance record: ``write_domain`` lists
    the record's warnings in the report (combine records with ``merged``)."""
    log.warning("%s: %s", source, message)
    return {WARNINGS: [f"{source}: {message}"]}


def merged(*records: dict) -> dict:
    """Provenance records in one; their warnings add up instead of replacing each other."""
    result: dict = {}
    for record in records:
        result |= {k: v for k, v in record.items() if k != WARNINGS}
        if record.get(WARNINGS):
            result[WARNINGS] = result.get(WARNINGS, []) + list(record[WARNINGS])
    return result


def other_image_counts(source: str, reference: str, differences: Sequence[str]) -> dict:
    """The warning for classes with other image counts than the benchmark's (a sample, a test
    set, another release): converted all the same, the counts named."""
    if not differences:
        return {}
    shown = ", ".join(differences[:10]) + (f" ... (+{len(differences) - 10} more)"
                                           if len(differences) > 10 else "")
    return warning(source, f"other image counts than {reference} (found vs expected): {shown}; "
                           "converted all the same, but results are not on the benchmark's "
                           "full domain")


def prepare_image(image: Image.Image | np.ndarray, settings: StorageSettings) -> Image.Image:
    """Greyscale stays 'L', everything else becomes 'RGB'; squash (as torchvision's
    ``Resize((s, s))`` on a PIL image: bilinear) and shrink to the storage resolution."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("L" if pil.mode in ("1", "I;16", "I", "LA") else "RGB")
    square = settings.squash_side
    if square is not None and min(pil.size) >= square:
        pil = pil.resize((square, square), Image.Resampling.BILINEAR)
    side = settings.short_side
    if side is not None and min(pil.size) > side:
        scale = side / min(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return pil


def _encode_item(item: Any, load: Loader, settings: StorageSettings
                 ) -> tuple[bytes, tuple[int, int, int]] | str:
    """Load and encode one item; an unreadable item returns the error text instead."""
    try:
        pil = prepare_image(load(item), settings)
        pil.load()
    except Exception as err:  # a broken raw file is counted and reported, never fatal by itself
        return f"{type(err).__name__}: {err}"
    codec = settings.codec
    if codec == "auto":
        codec = "png" if pil.mode == "L" else "jpeg"
    channels = 1 if pil.mode == "L" else 3
    return encode_image(pil, codec, settings.jpeg_quality), (pil.height, pil.width, channels)


def _encode_chunk(items: list[Any], load: Loader, settings: StorageSettings
                  ) -> list[tuple[bytes, tuple[int, int, int]] | str]:
    return [_encode_item(item, load, settings) for item in items]


def _encoded(items: Iterable[Any], load: Loader, settings: StorageSettings, workers: int
             ) -> Iterator[tuple[bytes, tuple[int, int, int]] | str]:
    """Encoded items in input order. Items are consumed lazily and at most a few chunks per
    worker are in flight, so a source of 50 M images (QuickDraw) never sits in memory."""
    if workers <= 1:
        yield from (_encode_item(item, load, settings) for item in items)
        return
    pool = ProcessPoolExecutor(workers, initializer=_worker_init)
    pending: deque[Future] = deque()
    try:
        for chunk in _chunks(items, _CHUNK):
            pending.append(pool.submit(_encode_chunk, chunk, load, settings))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BaseException:
        # Ctrl-C or an error: drop the queued chunks and do not wait for the running ones (a
        # second Ctrl-C during that wait would leave the pool's manager thread hanging).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _worker_init() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool (a worker interrupted in
    the middle of a chunk would leave the pool's manager thread waiting forever), and end when
    the main process is killed instead of lingering with the output file's lock (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # not Linux (no prctl): a killed conversion's workers may linger
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def item_name(item: Any) -> str:
    """A readable name for a raw item in reports: its path when it has one."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, tuple) and item and isinstance(item[0], (str, os.PathLike)):
        return str(item[0])
    return repr(item)[:80]


def two_level_hierarchy(classes: Sequence[ClassSpec]) -> Hierarchy | None:
    """Superclasses from ClassSpec.superclass, in order of first appearance."""
    if all(c.superclass is None for c in classes):
        return None
    if any(c.superclass is None for c in classes):
        missing = next(c.name for c in classes if c.superclass is None)
        raise ValueError(f"class {missing!r} has no superclass while others have one")
    names = list(dict.fromkeys(c.superclass for c in classes))
    parent = np.array([names.index(c.superclass) for c in classes])
    return Hierarchy("two_level", tuple(names), class_parent=parent)


def write_domain(
    out: str | os.PathLike,
    *,
    source: str,
    converter_version: str,
    classes: Sequence[ClassSpec],
    load: Loader,
    settings: StorageSettings | None = None,
    extra_settings: dict | None = None,
    hierarchy: Hierarchy | None = None,
    workers: int = 1,
) -> ConversionReport:
    """Convert ``classes`` into the domain file ``out`` and write ``out.report.json`` beside it.

    A finished ``out`` of the same plan is up to date and left alone; one of another plan is an
    ``OutputError`` naming what changed (delete it, or ``convert --force``, to rebuild). The
    ``warnings`` of ``extra_settings`` (see ``warning``) go to the report, the rest to the
    file's settings. ``load`` must be a picklable (module-level) function when ``workers > 1``.
    """
    out = Path(out)
    check_output(out)
    settings = settings or StorageSettings()
    extra = dict(extra_settings or {})
    warnings = extra.pop(WARNINGS, [])
    order = [SPLITS.index(c.split) if c.split in SPLITS else -1 for c in classes]
    if -1 in order:
        raise ValueError(f"{source}: unknown split {classes[order.index(-1)].split!r}")
    if order != sorted(order):
        raise ValueError(f"{source}: classes must be listed train -> valid -> test")
    empty = [c.name for c in classes if not c.items]
    if empty:
        raise StoreError(f"{source}: classes with no raw images: {empty[:10]}")
    hierarchy = hierarchy or two_level_hierarchy(classes)
    total = sum(len(c.items) for c in classes)
    report = ConversionReport(source=source, output=str(out), classes=len(classes),
                              warnings=list(warnings))
    started = time.perf_counter()
    writer = DomainWriter(
        out, source=source, converter_version=converter_version,
        class_names=[c.name for c in classes], class_splits=[c.split for c in classes],
        settings={**settings.as_dict(), **extra}, hierarchy=hierarchy,
        plan={"class_sizes": [len(c.items) for c in classes]})
    if out.exists():
        return _existing(out, writer)
    try:
        with writer:
            start = writer.resume_class  # > 0: a previous run's partial file had these classes
            report.resumed_after_classes = start
            todo = list(enumerate(classes))[start:]
            results = _encoded((item for _, c in todo for item in c.items), load, settings,
                               workers)
            labelled = ((label, item) for label, c in todo for item in c.items)
            progress = tqdm(zip(labelled, results, strict=True), total=total,
                            initial=sum(len(c.items) for c in classes[:start]),
                            desc=f"convert {source}", unit="img", mininterval=2.0)
            added = np.zeros(len(classes), dtype=np.int64)
            for (label, item), result in progress:
                if isinstance(result, str):
                    writer.skip(item_name(item), result, label)
                    continue
                writer.add(label, *result)
                added[label] += 1
            report.skipped = writer.skipped
            _check_readable(source, classes, start, added, report.skipped, total,
                            settings.max_bad_fraction)
            report.images = total - len(report.skipped)
    except StoreError as err:  # the report says what was read and why it failed
        report.error = str(err)
        report.seconds = round(time.perf_counter() - started, 2)
        report.write(report_path(out))
        raise
    report.seconds = round(time.perf_counter() - started, 2)
    report.write(report_path(out))
    for name, reason in report.skipped:
        log.warning("%s: skipped %s (%s)", source, name, reason)
    log.info("%s: wrote %d images of %d classes to %s (%d skipped) in %.1fs", source,
             report.images, report.classes, out, len(report.skipped), report.seconds)
    return report


def _check_readable(source: str, classes: Sequence[ClassSpec], start: int, added: np.ndarray,
                    skipped: list[tuple[str, str]], total: int, max_bad_fraction: float) -> None:
    """Fail when a class got no image (naming its unreadable files) or too many are bad."""
    empty = [label for label in range(start, len(classes)) if added[label] == 0]
    if empty:
        shown = "; ".join(f"{classes[label].name!r}: "
                          + ", ".join(item_name(i) for i in list(classes[label].items)[:3])
                          for label in empty[:10])
        raise StoreError(f"{source}: {len(empty)} classes have no readable image (every file "
                         f"of theirs failed to load, reasons in the report): {shown}")
    if len(skipped) > max_bad_fraction * total:
        raise StoreError(
            f"{source}: {len(skipped)} of {total} raw images are unreadable, more than "
            f"max_bad_fraction={max_bad_fraction}; first: {skipped[:3]}")


def _existing(out: Path, writer: DomainWriter) -> ConversionReport:
    """A finished ``out``: up to date when made by the same plan, else an error naming the
    changes (the file is never replaced without being asked to)."""
    try:
        attrs, names, splits, skipped = finished_attrs(out)
    except StoreError as err:
        raise OutputError(f"{err}; delete it, or pass --force, to convert again") from err
    if attrs.get("fingerprint") != writer.fingerprint:
        changes = _changes(attrs, names, splits, writer)
        raise OutputError(f"{out} exists and was converted with other settings or from "
                          f"another raw tree: {'; '.join(changes)}. Pass --force (or delete "
                          "it) to rebuild it with the new ones")
    log.info("%s: up to date (same source, converter version, settings and raw class list); "
             "left alone (pass --force to rebuild)", out)
    path = report_path(out)
    if path.exists():
        document = json.loads(path.read_text())
        known = {k: v for k, v in document.items() if k in ConversionReport.__dataclass_fields__}
        report = ConversionReport(**known)
    else:
        report = ConversionReport(source=attrs["source"], output=str(out),
                                  images=int(attrs["num_images"]),
                                  classes=int(attrs["num_classes"]), skipped=skipped)
    report.up_to_date = True
    return report


def _changes(attrs: dict, names: list[str], splits: list[str], writer: DomainWriter
             ) -> list[str]:
    """What differs between a finished file and a new plan, as 'key: old -> new'."""
    old = {"source": attrs.get("source"), "converter_version": attrs.get("converter_version"),
           **{f"settings.{k}": v for k, v in json.loads(attrs.get("settings", "{}")).items()}}
    # through JSON, as the file holds them (tuples become lists)
    settings = json.loads(json.dumps(writer.settings, default=str))
    new = {"source": writer.source, "converter_version": writer.converter_version,
           **{f"settings.{k}": v for k, v in settings.items()}}
    changes = [f"{key}: {_shown(old.get(key, _UNSET))} -> {_shown(new.get(key, _UNSET))}"
               for key in sorted(set(old) | set(new))
               if old.get(key, _UNSET) != new.get(key, _UNSET)]
    if names != writer.class_names or splits != writer.class_splits:
        changes.append(f"classes: {len(names)} stored -> {len(writer.class_names)} in the raw "
                       "tree now (names or splits differ)")
    return changes or ["the raw tree lists other images per class"]


_UNSET = object()


def _shown(value: Any) -> str:
    text = "(unset)" if value is _UNSET else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
