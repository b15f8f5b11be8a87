"""What the selection and evaluation jobs share: a method over one domain's stored episodes.

``open_episodes`` reads the store and the episode file and checks that they belong together
(and, given a setting name, that the episodes are of that setting); ``load_episode_job`` adds
the method, built from its model file, and the test transform at the model's image size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from amt import devices
from amt.episode_data import EpisodeDataset
from amt.episode_files import check_episodes_fit, check_episodes_match, load_episodes
from amt.episodes import Episode
from amt.methods import Method, load_method
from amt.specs import Hyper
from amt.transforms import default_resize
from amt.transforms import test_transform as make_test_transform
from data_prep.store import DomainStore


@dataclass
class EpisodeJob:
    """A method ready to adapt to the stored episodes of one domain."""

    device: torch.device
    store: DomainStore
    episodes: list[Episode]
    method: Method
    image_size: int
    resize: int
    dataset: EpisodeDataset

    def batches(self, workers: int) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
        return episode_batches(self.dataset, workers, self.device)


def load_episode_job(method: str, model: Path, store: Path, episodes: Path, hyper: Hyper, *,
                     seed: int, device: str, amp: bool, backbone_checkpoint: Path | None,
                     image_size: int | None, resize: int | None, test_transform: str,
                     setting_name: str | None = None) -> EpisodeJob:
    """The method ``method`` over ``model`` on the episodes of ``episodes`` from ``store``,
    its images through the test transform ``test_transform`` (a registry.TEST_TRANSFORMS name)."""
    where = devices.pick_device(device)
    domain = DomainStore(store)
    stored, meta = load_episodes(episodes)
    check_episodes_match(domain, meta)
    check_episodes_fit(domain, stored, meta, episodes, setting_name)
    built = load_method(method, model, hyper, where, amp, seed, backbone_checkpoint)
    size, resize = image_sizes(built, image_size, resize, model)
    dataset = EpisodeDataset(domain, stored, make_test_transform(size, resize, test_transform),
                             seed)
    return EpisodeJob(where, domain, stored, built, size, resize, dataset)


def image_sizes(method: Method, image_size: int | None, resize: int | None, model: Path
                ) -> tuple[int, int]:
    """(image size, resize of the test transform): the model's size unless given (it must
    match), and round(size * 146 / 128) unless given."""
    model_size = method.backbone.vit.patch_embed.img_size[0]
    size = image_size or model_size
    if size != model_size:
        raise ValueError(f"--image-size {size}: the model {model} was built for {model_size} px")
    return size, resize or default_resize(size)


def episode_batches(dataset: EpisodeDataset, workers: int, device: torch.device
                    ) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """(index, (xs, ys, xq, yq) on ``device``) for every episode, loaded by ``workers``."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for index, batch in enumerate(loader):
        yield index, tuple(t.to(device, non_blocking=True) for t in batch)
