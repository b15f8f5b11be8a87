"""Learning-rate schedules, pure functions of the step: a resumed run needs no scheduler state."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amt.specs import TrainConfig


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay towards 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def timm_cosine_lr(epoch: int, epochs: int, warmup_epochs: int, base: float, warmup_lr: float,
                   min_lr: float) -> float:
    """The lr of timm's ``CosineLRScheduler`` at ``epoch`` as ``timm.scheduler.create_scheduler``
    builds it from the AMT release's and PMF's arguments (sched cosine, one cycle, no noise,
    k_decay 1, warmup_prefix False): a linear warm-up from ``warmup_lr`` over ``warmup_epochs``,
    then the cosine from ``base`` to ``min_lr`` over all ``epochs``, counted from epoch 0 (so at
    the end of the warm-up the cosine is already past its peak), ``min_lr`` after the last."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def episode_lr(config: TrainConfig, index: int) -> float:
    """The learning rate of meta-training episode ``index`` under ``config.schedule``:

    - cosine_episode: ``cosine_lr`` over the episodes, ``warmup_epochs`` of them warm-up;
    - cosine_epoch_timm: constant within an epoch, ``timm_cosine_lr`` of the epoch, as the AMT
      release steps its scheduler before each epoch (main.py:149-150);
    - cosine_epoch_timm_after: as PMF steps it after each epoch (main.py:159-167), so epoch e
      runs at the lr of epoch e - 1 (epoch 0 at the scheduler's initial warmup_lr, its epoch 0).
    """
    epoch = index // config.episodes_per_epoch
    if config.schedule == "cosine_episode":
        return cosine_lr(index, config.total_episodes,
                         config.warmup_epochs * config.episodes_per_epoch, config.lr)
    if config.schedule == "cosine_epoch_timm_after":
        epoch = max(epoch - 1, 0)
    return timm_cosine_lr(epoch, config.epochs, config.warmup_epochs, config.lr,
                          config.warmup_lr, config.min_lr)
