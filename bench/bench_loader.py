"""Episode loader throughput against the ViT-S/16 forward pass that consumes it, on this CPU.

Builds a 64-class x 40-image domain of natural photographs (random crops of scikit-learn's sample
photos at shorter side 160, JPEG q95, as bench_store.py makes them) in a temporary folder, then
measures:
  - per-image cost of read + decode, the test transform and the train transform;
  - episodes per second of EpisodeDataset (stored episodes, test transform) and
    SampledEpisodeDataset (episodes sampled on the fly, train transform) for 5-way 1-shot and
    5-way 5-shot with 15 queries, through a DataLoader with 0 and 2 workers;
  - the ViT-S/16 forward time at 128 px for one 5w5s episode (100 images), eval, no_grad.
Every figure is the best of ``--repeats`` runs (as timeit reports), for the loader and the ViT
alike, because other processes on a shared machine only ever make a run slower. Run:
    python bench/bench_loader.py [--episodes 20] [--repeats 3] [--image-size 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from bench_store import photo_crops  # same directory: the shared natural-image generator
from torch.utils.data import DataLoader

from amt.episode_data import EpisodeDataset, SampledEpisodeDataset
from amt.episodes import FixedSampler, draw_episodes, episode_rng
from amt.transforms import test_transform, train_transform
from data_prep.convert import ClassSpec, StorageSettings, write_domain
from data_prep.store import DomainStore

CLASSES, PER_CLASS, QUERIES = 64, 40, 15


def build_store(folder: Path) -> DomainStore:
    rng = np.random.default_rng(0)
    images = photo_crops(CLASSES * PER_CLASS, rng)
    classes = [ClassSpec(f"c{c}", "train", images[c * PER_CLASS:(c + 1) * PER_CLASS])
               for c in range(CLASSES)]
    path = folder / "photos.h5"
    write_domain(path, source="bench", converter_version="0", classes=classes, load=np.asarray,
                 settings=StorageSettings(short_side=None, codec="jpeg"))
    return DomainStore(path)


def best_seconds(run, repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def per_image_us(store: DomainStore, image_size: int, repeats: int, n: int = 200
                 ) -> dict[str, float]:
    indices = np.random.default_rng(1).integers(0, store.num_images, n)
    images = [store.read(int(i)) for i in indices]
    rngs = [episode_rng(0, p) for p in range(n)]
    test, train = test_transform(image_size), train_transform(image_size)
    runs = {
        "read + decode": lambda: [store.read(int(i)) for i in indices],
        "test transform": lambda: [test(im, None) for im in images],
        "train transform": lambda: [train(im, rng) for im, rng in zip(images, rngs, strict=True)],
    }
    return {name: round(best_seconds(run, repeats) / n * 1e6) for name, run in runs.items()}


def episodes_per_s(dataset, workers: int, repeats: int) -> float:
    """Best rate over fresh DataLoaders, timed from the first episode (start-up not counted)."""
    rates = []
    for _ in range(repeats):
        iterator = iter(DataLoader(dataset, batch_size=None, num_workers=workers))
        next(iterator)
        start = time.perf_counter()
        count = sum(1 for _ in iterator)
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def loader_rows(store: DomainStore, episodes: int, image_size: int, repeats: int
                ) -> list[dict]:
    rows = []
    for shots in (1, 5):
        sampler = FixedSampler(5, shots, QUERIES)
        stored = draw_episodes(store, "train", sampler, episodes + 1, seed=0)
        datasets = {
            "test (stored)": EpisodeDataset(store, stored, test_transform(image_size), seed=0),
            "train (sampled)": SampledEpisodeDataset([store], "train", sampler,
                                                     train_transform(image_size), seed=0,
                                                     length=episodes + 1),
        }
        for transform, dataset in datasets.items():
            for workers in (0, 2):
                rows.append({"setting": f"5w{shots}s q{QUERIES}", "transform": transform,
                             "workers": workers,
                             "episodes_per_s": round(episodes_per_s(dataset, workers, repeats),
                                                     2)})
    return rows


def vit_seconds(image_size: int, repeats: int, images: int = 5 * (5 + QUERIES)) -> float:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=image_size,
                              num_classes=0).eval()
    x = torch.rand(images, 3, image_size, image_size)
    with torch.no_grad():
        model(x)  # warm-up
        return best_seconds(lambda: model(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20, help="timed episodes per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; best is kept")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp))
        costs = per_image_us(store, args.image_size, args.repeats)
        rows = loader_rows(store, args.episodes, args.image_size, args.repeats)
    vit = vit_seconds(args.image_size, args.repeats)
    ratios = {transform: round(vit * max(r["episodes_per_s"] for r in rows
                                         if r["setting"].startswith("5w5s")
                                         and r["transform"] == transform), 1)
              for transform in dict.fromkeys(r["transform"] for r in rows)}
    result = {"cpu_threads": torch.get_num_threads(), "per_image_us": costs, "loader": rows,
              "vit_s16_seconds_per_5w5s_episode": round(vit, 3),
              "vit_episodes_per_s": round(1 / vit, 2), "loader_over_vit_5w5s": ratios}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"Per image (us, {result['cpu_threads']} torch threads): "
          + ", ".join(f"{k} {v}" for k, v in costs.items()))
    print("\n| setting | transform | workers | episodes/s |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['transform']} | {r['workers']} | {r['episodes_per_s']} |")
    print(f"| 5w5s q{QUERIES} | ViT-S/16 forward at {args.image_size} px, eval, no_grad | - | "
          f"{result['vit_episodes_per_s']} |")
    print("\nBest 5w5s loader rate / ViT-S forward rate (target >= 10x): "
          + ", ".join(f"{t} {r}x" for t, r in ratios.items()))


if __name__ == "__main__":
    main()
