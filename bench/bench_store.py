"""Storage benchmark: bytes per image and random single-image read rates.

1. Layouts. Compares, on the same images, three ways to hold a domain in HDF5:
  encoded-flat  the project's format: encoded bytes back to back + offsets (data_prep.store)
  encoded-vlen  encoded bytes in a variable-length dataset, one element per image
  decoded-fixed fixed-size uint8 arrays (N, H, W, C), images resized to one size
Images are random crops of the real photographs scikit-learn ships (natural-image statistics)
stored at 160 px, and rendered-glyph-like greyscale 64 px images.

2. Storage settings (``data_prep.convert.StorageSettings``), in the project's format, on
photo crops of ImageNet-like sizes (shorter side 250-427 px, aspect 3:4-4:3, every side >= 224):
the default (JPEG q95 at a 160-px shorter side), PMF's pixels (squashed to 224 x 224, PNG:
lossless) and the native size as PNG; PMF's own files hold the 224 x 224 arrays uncompressed
(150,528 bytes an image). Reads include decoding. ``GB / 1.28M`` scales bytes per image to
ImageNet's training set (Meta-Dataset's ilsvrc_2012), the largest domain. Run:
    python bench/bench_store.py [--images 2000] [--reads 3000] [--settings-images 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from data_prep.convert import ClassSpec, StorageSettings, prepare_image, write_domain
from data_prep.store import DomainStore, decode_image


def photo_crops(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random crops (aspect 3:4 to 4:3) of the sample photos, resized to shorter side 160."""
    photos = load_sample_images().images
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        h = int(rng.integers(180, 400))
        w = int(h * rng.uniform(0.75, 1.33))
        w = min(w, photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = Image.fromarray(photo[top:top + h, left:left + w])
        crops.append(np.asarray(prepare_image(crop, StorageSettings(short_side=160))))
    return crops


def imagenet_like(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random crops of the sample photos at ImageNet-like sizes, both sides >= 224."""
    photos = load_sample_images().images
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        h = int(rng.integers(250, photo.shape[0] + 1))
        w = min(int(h * rng.uniform(0.75, 1.33)), photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crops.append(np.ascontiguousarray(photo[top:top + h, left:left + w]))
    return crops


STORAGE = {  # name -> the settings of a conversion
    "default: JPEG q95, shorter side 160": StorageSettings(),
    "PMF's pixels: squash 224, PNG": StorageSettings(short_side=None, squash_side=224,
                                                     codec="png"),
    "native size, PNG": StorageSettings(short_side=None, codec="png"),
}
IMAGENET_TRAIN = 1_281_167


def storage_settings(images: list[np.ndarray], reads: int, rng: np.random.Generator
                     ) -> list[dict]:
    """Bytes per image on disk and read rates of each storage setting on the same images."""
    rows = []
    classes = [ClassSpec(f"c{i}", "test", images[i:i + 20]) for i in range(0, len(images), 20)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in STORAGE.items():
            path = Path(tmp) / "domain.h5"
            start = time.perf_counter()
            write_domain(path, source="bench", converter_version="0", classes=classes,
                         load=np.asarray, settings=settings)
            seconds = time.perf_counter() - start
            store = DomainStore(path)
            per_image = path.stat().st_size / len(images)
            rows.append({"setting": name, "bytes_per_image": round(per_image),
                         "gb_per_imagenet": round(per_image * IMAGENET_TRAIN / 1e9, 1),
                         "encode_ms_per_image": round(1000 * seconds / len(images), 1),
                         "reads_per_s": round(_rate(lambda i, s=store: s.read(int(i)),
                                                    rng.integers(0, len(images), reads)))})
            store.close()
            path.unlink()
    return rows


def glyph_like(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """White strokes on black at 64 px, like the rendered glyph domain."""
    images = []
    for _ in range(n):
        canvas = np.zeros((64, 64), np.uint8)
        for _ in range(3):
            r, c = rng.integers(8, 56, 2)
            canvas[max(0, r - 14):r + 14, max(0, c - 2):c + 2] = 255
            canvas[max(0, r - 2):r + 2, max(0, c - 10):c + 10] = 255
        images.append(canvas)
    return images


def write_layouts(images: list[np.ndarray], folder: Path) -> dict[str, Path]:
    per_class = 20
    classes = [ClassSpec(f"c{i}", "test", images[i:i + per_class])
               for i in range(0, len(images), per_class)]
    flat = folder / "flat.h5"
    write_domain(flat, source="bench", converter_version="0", classes=classes, load=np.asarray,
                 settings=StorageSettings(short_side=None))
    store = DomainStore(flat)
    vlen = folder / "vlen.h5"
    with h5py.File(vlen, "w") as f:
        ds = f.create_dataset("images", (store.num_images,), dtype=h5py.vlen_dtype(np.uint8),
                              chunks=(256,))
        for i in range(store.num_images):
            ds[i] = np.frombuffer(store.read_bytes(i), np.uint8)
    fixed = folder / "fixed.h5"
    size = int(np.median([min(im.shape[:2]) for im in images]))
    channels = 1 if images[0].ndim == 2 else 3
    with h5py.File(fixed, "w") as f:
        ds = f.create_dataset("images", (len(images), size, size, channels), np.uint8,
                              chunks=(1, size, size, channels))
        for i, im in enumerate(images):
            ds[i] = np.asarray(Image.fromarray(im).resize((size, size))).reshape(
                size, size, channels)
    return {"encoded-flat": flat, "encoded-vlen": vlen, "decoded-fixed": fixed}


def read_rates(paths: dict[str, Path], n: int, reads: int, rng: np.random.Generator) -> dict:
    order = rng.integers(0, n, reads)
    rates = {}
    store = DomainStore(paths["encoded-flat"])
    rates["encoded-flat"] = _rate(lambda i: store.read(int(i)), order)
    with h5py.File(paths["encoded-vlen"], "r") as f:
        ds = f["images"]
        rates["encoded-vlen"] = _rate(lambda i: decode_image(ds[int(i)]), order)
    with h5py.File(paths["decoded-fixed"], "r") as f:
        ds = f["images"]
        rates["decoded-fixed"] = _rate(lambda i: ds[int(i)], order)
    return rates


def _rate(read, order: np.ndarray) -> float:
    read(order[0])
    start = time.perf_counter()
    for i in order:
        read(i)
    return len(order) / (time.perf_counter() - start)


def run(kind: str, images: list[np.ndarray], reads: int, rng: np.random.Generator) -> list[dict]:
    decoded_bytes = np.mean([im.size for im in images])
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_layouts(images, Path(tmp))
        rates = read_rates(paths, len(images), reads, rng)
        rows = []
        for layout, path in paths.items():
            rows.append({
                "images": kind, "layout": layout,
                "bytes_per_image": round(path.stat().st_size / len(images)),
                "decoded_bytes_per_image": round(decoded_bytes),
                "reads_per_s": round(rates[layout]),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--settings-images", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = run("photo 160px RGB (JPEG q95)", photo_crops(args.images, rng), args.reads, rng)
    rows += run("glyph 64px grey (PNG)", glyph_like(args.images, rng), args.reads, rng)
    sample = imagenet_like(args.settings_images, rng)
    settings = storage_settings(sample, args.reads, rng)
    if args.json:
        print(json.dumps({"layouts": rows, "settings": settings}, indent=2))
        return
    print("| images | layout | bytes/image on disk | decoded uint8 bytes/image | random reads/s "
          "(incl. decode) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['layout']} | {r['bytes_per_image']} | "
              f"{r['decoded_bytes_per_image']} | {r['reads_per_s']} |")
    mean_side = np.mean([min(im.shape[:2]) for im in sample])
    print(f"\n{len(sample)} photo crops, mean shorter side {mean_side:.0f} px:\n")
    print("| storage setting | bytes/image on disk | GB / 1.28M images | encode ms/image | "
          "random reads/s (incl. decode) |")
    print("|---|---:|---:|---:|---:|")
    for r in settings:
        print(f"| {r['setting']} | {r['bytes_per_image']} | {r['gb_per_imagenet']} | "
              f"{r['encode_ms_per_image']} | {r['reads_per_s']} |")


if __name__ == "__main__":
    main()
