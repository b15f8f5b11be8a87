"""Learning-rate schedules, pure functions of the step: a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay towards 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * progress))
