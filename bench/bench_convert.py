"""Conversion throughput and episode reads: the project's domain file vs a PMF-style layout.

A synthetic raw tree of realistic JPEGs (random crops, rescales, flips and colour shifts of the
photographs scikit-learn ships, about 400x300, camera-like quality 90) is converted with the
shared engine (data_prep.convert.write_domain: shorter side 160, JPEG q95) with 1 and 2 workers.
The same stored images are then written in the layout of hushell/pmf_cvpr22: one HDF5 file per
class, one group per image holding the decoded uint8 array (plus its label and id), at the same
stored resolution, read as PMF reads it (class files kept open, ``group['image'][()]``).
Reported: images/s, bytes per image on disk, and the time to read one 5-way 5-shot 15-query
episode (100 images, decode included), page cache warm and dropped (posix_fadvise DONTNEED).
Run:
    python bench/bench_convert.py [--classes 40] [--images 50] [--episodes 30]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from data_prep.convert import ClassSpec, write_domain
from data_prep.sources.metadataset_common import load_rgb
from data_prep.store import DomainStore

WAYS, SHOTS, QUERIES = 5, 5, 15


def raw_tree(root: Path, classes: int, per_class: int, rng: np.random.Generator) -> list[ClassSpec]:
    """``classes`` folders of ``per_class`` 400x300-ish JPEGs cut from natural photographs."""
    photos = load_sample_images().images
    specs = []
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True)
        files = []
        for i in range(per_class):
            path = folder / f"{i:04d}.jpg"
            natural_jpeg(photos[rng.integers(len(photos))], rng).save(path, quality=90)
            files.append(str(path))
        specs.append(ClassSpec(folder.name, "test", files))
    return specs


def natural_jpeg(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    height = int(rng.integers(200, photo.shape[0] + 1))
    width = min(int(height * rng.uniform(1.2, 1.45)), photo.shape[1])
    top = rng.integers(0, photo.shape[0] - height + 1)
    left = rng.integers(0, photo.shape[1] - width + 1)
    crop = photo[top:top + height, left:left + width].astype(np.float32)
    crop = np.clip(crop * rng.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)
    image = Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return image.resize((400, int(400 * height / width)), Image.Resampling.BICUBIC)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the conversion workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def convert_rate(classes: list[ClassSpec], out: Path, workers: int) -> tuple[float, float]:
    """Images per wall-clock second, and CPU milliseconds per image over all processes."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    report = write_domain(out, source="bench", converter_version="0", classes=classes,
                          load=load_rgb, workers=workers)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return report.images / wall, 1000 * cpu / report.images


def write_pmf_layout(store: DomainStore, folder: Path) -> list[Path]:
    """One HDF5 file per class, one group per image holding its decoded array, label and id
    (pmf_cvpr22 scripts/convert_tfrecord_to_h5.py)."""
    folder.mkdir()
    paths = []
    for c in range(store.num_classes):
        path = folder / f"{c}.h5"
        with h5py.File(path, "w") as f:
            for k, i in enumerate(store.images_of_class(c)):
                group = f.create_group(str(k))
                group.create_dataset("image", data=store.read(int(i)))
                group.create_dataset("label", data=np.array(c))
                group.create_dataset("id", data=np.array(int(i)))
        paths.append(path)
    return paths


def episodes(store: DomainStore, n: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """(class, index within class) of the 100 images of each of ``n`` episodes."""
    drawn = []
    for _ in range(n):
        chosen = rng.choice(store.num_classes, WAYS, replace=False)
        drawn.append([(int(c), int(k)) for c in chosen
                      for k in rng.choice(store.class_sizes[c], SHOTS + QUERIES, replace=False)])
    return drawn


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def episode_ms(read: Callable[[int, int], np.ndarray], drawn: list, files: list[Path],
               cold: bool) -> float:
    """Median milliseconds to read and decode one episode: CPU time with a warm page cache (the
    work is all CPU, and CPU time is not inflated by other jobs on a shared machine), wall time
    with a dropped one (it includes waiting for the disk)."""
    clock = time.perf_counter if cold else time.process_time
    times = []
    for episode in drawn:
        if cold:
            drop_cache(files)
        start = clock()
        for c, k in episode:
            read(c, k)
        times.append(clock() - start)
    return 1000 * float(np.median(times))


def read_times(store_path: Path, pmf: list[Path], drawn: list) -> dict[str, dict[str, float]]:
    store = DomainStore(store_path)
    offsets = store.class_offsets
    handles = [h5py.File(p, "r") for p in pmf]  # PMF keeps every class file open
    try:
        ours = lambda c, k: store.read(int(offsets[c] + k))  # noqa: E731
        theirs = lambda c, k: handles[c][str(k)]["image"][()]  # noqa: E731
        for read in (ours, theirs):  # warm up handles and code paths
            episode_ms(read, drawn[:2], [], cold=False)
        return {name: {"warm": episode_ms(read, drawn, files, cold=False),
                       "cold": episode_ms(read, drawn, files, cold=True)}
                for name, read, files in (("ours", ours, [store_path]), ("pmf", theirs, pmf))}
    finally:
        for handle in handles:
            handle.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--images", type=int, default=50, help="images per class")
    parser.add_argument("--episodes", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        classes = raw_tree(tmp / "raw", args.classes, args.images, rng)
        n = args.classes * args.images
        raw_bytes = sum(Path(f).stat().st_size for c in classes for f in c.items) / n
        load_before = os.getloadavg()[0]
        rates = {w: convert_rate(classes, tmp / f"ours_{w}.h5", w) for w in (1, 2)}
        store = DomainStore(tmp / "ours_1.h5")
        pmf = write_pmf_layout(store, tmp / "pmf")
        os.sync()
        ours_bytes = (tmp / "ours_1.h5").stat().st_size / n
        pmf_bytes = sum(p.stat().st_size for p in pmf) / n
        times = read_times(tmp / "ours_1.h5", pmf, episodes(store, args.episodes, rng))
    side = f"{int(np.median(store.shapes[:, 0]))}x{int(np.median(store.shapes[:, 1]))}"
    print(f"{args.classes} classes x {args.images} JPEGs (raw: {raw_bytes / 1024:.1f} KiB/image,"
          f" ~400x300), stored at {side} px (median HxW); {os.cpu_count()} CPU cores, load "
          f"average {load_before:.1f} before converting, {os.getloadavg()[0]:.1f} at the end\n")
    print("| layout | convert img/s (CPU ms/img), 1 worker | 2 workers | bytes/image on disk | "
          "episode read, warm cache (CPU ms) | cold cache (wall ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    (r1, c1), (r2, c2) = rates[1], rates[2]
    print(f"| ours: one file, JPEG q95 | {r1:.0f} ({c1:.1f}) | {r2:.0f} ({c2:.1f}) | "
          f"{ours_bytes:,.0f} | {times['ours']['warm']:.1f} | {times['ours']['cold']:.1f} |")
    print(f"| PMF: file per class, group per decoded image | - | - | {pmf_bytes:,.0f} | "
          f"{times['pmf']['warm']:.1f} | {times['pmf']['cold']:.1f} |")
    print(f"\nPMF / ours on disk: {pmf_bytes / ours_bytes:.1f}x; episode = {WAYS}-way {SHOTS}-shot "
          f"{QUERIES}-query ({WAYS * (SHOTS + QUERIES)} images), median of {args.episodes}")


if __name__ == "__main__":
    main()
