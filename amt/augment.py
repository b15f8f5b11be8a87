"""PMF's DiffAugment (Zhao et al. 2020), types colour + translation, as test-time merging and
fine-tuning use it on the support.

It runs in the model's normalised input space, as in PMF, whose loader normalises before
augmenting: brightness +U(-0.5, 0.5) and the zero padding of a translation are in normalised
units, exactly the network inputs PMF produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from amt.backbones import Backbone

AUGMENT_PROB = 0.9  # PMF's aug_prob: the whole support is augmented with this probability
TRANSLATION = 0.125  # PMF's translation ratio (of the image side)


def diff_augment(x: Tensor, generator: torch.Generator, prob: float = AUGMENT_PROB) -> Tensor:
    """PMF's DiffAugment (Zhao et al. 2020) with types colour + translation on [n, C, H, W]:
    with probability ``prob`` the whole batch is augmented: flipped horizontally with odds 1/2,
    then per image brightness +U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5) and a
    translation by up to 12.5% of the side with zero padding. Random draws come from
    ``generator`` (a CPU generator: the same draws on any device)."""
    coins = torch.rand(2, generator=generator)
    if coins[0] >= prob:
        return x
    if coins[1] < 0.5:
        x = x.flip(3)
    n = len(x)
    factors = torch.rand(3, n, 1, 1, 1, generator=generator).to(x.device, x.dtype)
    x = x + (factors[0] - 0.5)
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * (2 * factors[1]) + grey
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (factors[2] + 0.5) + mean
    return _translate(x, generator)


def _translate(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by whole pixels (DiffAugment's rand_translation), zeros shifted in."""
    n, _, h, w = x.shape
    shifts = [torch.randint(-int(s * TRANSLATION + 0.5), int(s * TRANSLATION + 0.5) + 1, (n, 1),
                            generator=generator).to(x.device) for s in (h, w)]
    rows = (torch.arange(h, device=x.device) + shifts[0] + 1).clamp(0, h + 1)  # [n, h]
    cols = (torch.arange(w, device=x.device) + shifts[1] + 1).clamp(0, w + 1)  # [n, w]
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # [n, h + 2, w + 2, C]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment_support(backbone: Backbone, x: Tensor, generator: torch.Generator) -> Tensor:
    """One DiffAugment copy of [0, 1] images, augmented in the backbone's normalised space and
    mapped back, so the backbone sees exactly PMF's augmented inputs."""
    normalised = (x - backbone.mean) / backbone.std
    return diff_augment(normalised, generator) * backbone.std + backbone.mean
