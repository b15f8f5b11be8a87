"""Datasets that load episodes' pixels: item i -> ``(xs, ys, xq, yq)``, plain tensors (PMF's
form). Image p of episode i is transformed with ``episode_rng(seed, i, p)``: results do not
depend on process, worker count or order of access."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from amt.episodes import Episode, Sampler, check_int, episode_rng
from amt.transforms import Transform
from data_prep.store import DomainStore


def load_episode(store: DomainStore, episode: Episode, transform: Transform, seed: int,
                 index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read and transform an episode's images: ``(xs, ys, xq, yq)``.

    Image p (support first, then query) is transformed with ``episode_rng(seed, index, p)``.
    Stacked with numpy: torch.stack splits the copy over intra-op threads, which stalls (seen:
    50x slower) when other processes hold the cores.
    """
    def images(indices: np.ndarray, start: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([
            transform(store.read(int(j)), episode_rng(seed, index, start + p)).numpy()
            for p, j in enumerate(indices)]))

    xs = images(episode.support, 0)
    xq = images(episode.query, len(episode.support))
    return xs, torch.tensor(episode.support_labels), xq, torch.tensor(episode.query_labels)


class EpisodeDataset(Dataset):
    """Stored episodes of one store; item i -> ``(xs, ys, xq, yq)``."""

    def __init__(self, store: DomainStore, episodes: list[Episode], transform: Transform,
                 seed: int) -> None:
        self.store, self.episodes, self.transform = store, list(episodes), transform
        self.seed = check_int("seed", seed, 0)
        top = max((int(max(e.support.max(), e.query.max())) for e in self.episodes), default=-1)
        if top >= store.num_images:
            raise ValueError(f"{store.path}: episodes name image {top} but the store has "
                             f"{store.num_images}; were they drawn from another store?")

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.episodes):
            raise IndexError(f"episode {index} outside [0, {len(self.episodes)})")
        return load_episode(self.store, self.episodes[index], self.transform, self.seed, index)


class SampledEpisodeDataset(Dataset):
    """``length`` episodes sampled on demand (meta-training); item i -> ``(xs, ys, xq, yq)``.

    Episode i uses ``episode_rng(seed, i)``: with several stores it first picks one uniformly
    (Meta-Dataset's multi-source rule), then samples the episode from it. With one store the
    episodes equal ``draw_episodes(store, split, sampler, length, seed)``.
    """

    def __init__(self, stores: list[DomainStore], split: str, sampler: Sampler,
                 transform: Transform, seed: int, length: int) -> None:
        if not stores:
            raise ValueError("SampledEpisodeDataset needs at least one store")
        self.stores, self.split, self.sampler = list(stores), split, sampler
        self.transform = transform
        self.seed = check_int("seed", seed, 0)
        self.length = check_int("length", length, 1)
        for store in self.stores:  # fail here, not later inside a worker
            sampler.check(store, split)

    def __len__(self) -> int:
        return self.length

    def episode(self, index: int) -> tuple[int, Episode]:
        """Which store (its position in ``stores``) and episode item ``index`` uses."""
        if not 0 <= index < self.length:
            raise IndexError(f"episode {index} outside [0, {self.length})")
        rng = episode_rng(self.seed, index)
        source = int(rng.integers(len(self.stores))) if len(self.stores) > 1 else 0
        return source, self.sampler.sample(self.stores[source], self.split, rng)

    def __getitem__(self, index: int):
        source, episode = self.episode(index)
        return load_episode(self.stores[source], episode, self.transform, self.seed, index)
