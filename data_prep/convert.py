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

from data_prep.store import SPLITS, DomainWriter, Hierarchy, StoreError, encode_image

log = logging.getLogger(__name__)

Loader = Callable[[Any], "Image.Image | np.ndarray"]
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


@dataclass
class StorageSettings:
    """How images are stored; part of each file's provenance."""

    short_side: int | None = 160  # resize so the shorter side is at most this; None keeps native
    codec: str = "auto"  # 'png', 'jpeg', or 'auto' (PNG for greyscale, JPEG for colour)
    jpeg_quality: int = 95
    max_bad_fraction: float = 0.01  # fail when more than this fraction of items is unreadable

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ConversionReport:
    source: str
    output: str
    images: int = 0
    classes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # this run's; a resumed run does not count the earlier ones
    resumed_after_classes: int = 0  # classes a previous run's partial file already held

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        os.replace(tmp, path)


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")


def prepare_image(image: Image.Image | np.ndarray, settings: StorageSettings) -> Image.Image:
    """Greyscale stays 'L', everything else becomes 'RGB'; shrink to the storage resolution."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("L" if pil.mode in ("1", "I;16", "I", "LA") else "RGB")
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

    ``load`` must be a picklable (module-level) function when ``workers > 1``.
    """
    out = Path(out)
    settings = settings or StorageSettings()
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
    report = ConversionReport(source=source, output=str(out), classes=len(classes))
    started = time.perf_counter()
    writer = DomainWriter(
        out, source=source, converter_version=converter_version,
        class_names=[c.name for c in classes], class_splits=[c.split for c in classes],
        settings={**settings.as_dict(), **(extra_settings or {})}, hierarchy=hierarchy,
        plan={"class_sizes": [len(c.items) for c in classes]})
    with writer:
        start = writer.resume_class  # > 0: a previous run's partial file had these classes
        report.resumed_after_classes = start
        todo = list(enumerate(classes))[start:]
        results = _encoded((item for _, c in todo for item in c.items), load, settings, workers)
        labelled = ((label, item) for label, c in todo for item in c.items)
        progress = tqdm(zip(labelled, results, strict=True), total=total,
                        initial=sum(len(c.items) for c in classes[:start]),
                        desc=f"convert {source}", unit="img", mininterval=2.0)
        for (label, item), result in progress:
            if isinstance(result, str):
                writer.skip(item_name(item), result, label)
                continue
            writer.add(label, *result)
        bad = len(writer.skipped)
        if bad > settings.max_bad_fraction * total:
            raise StoreError(
                f"{source}: {bad} of {total} raw images are unreadable, more than "
                f"max_bad_fraction={settings.max_bad_fraction}; first: {writer.skipped[:3]}")
        report.images = total - bad
        report.skipped = writer.skipped
    report.seconds = round(time.perf_counter() - started, 2)
    report.write(report_path(out))
    for name, reason in report.skipped:
        log.warning("%s: skipped %s (%s)", source, name, reason)
    log.info("%s: wrote %d images of %d classes to %s (%d skipped) in %.1fs", source,
             report.images, report.classes, out, len(report.skipped), report.seconds)
    return report
