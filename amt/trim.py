"""STr, singular value trimming: a merged weight replaced by its best rank-k approximation.

It uses the eigendecomposition of each weight's smaller Gram matrix (float32, batched over the
layers of a shape) and projects onto the kept subspace: the same matrix as the truncated SVD at a
fraction of ``torch.linalg.svd``'s cost (bench/bench_eval.py measures both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def tall_stacks(weights: Iterable[Tensor]) -> Iterator[tuple[list[Tensor], Tensor, bool]]:
    """The weights grouped by shape: (the group, its float32 stack oriented tall [G, long,
    short], whether the weights are tall). ``w.mT @ w`` of the stack is the smaller Gram matrix
    of each weight, batched the way STr decomposes them."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w)
    for shape, group in groups.items():
        tall = shape[0] >= shape[1]
        stacked = torch.stack(group).float()
        yield group, stacked if tall else stacked.mT, tall


@torch.no_grad()
def trim_(weights: Iterable[Tensor], ratio: float) -> None:
    """Replace each matrix in place by its best rank-floor(ratio * min(out, in)) approximation.

    For a tall W (out >= in) with V_k the top-k eigenvectors of W^T W, the truncated SVD is
    W V_k V_k^T; wide matrices are handled transposed. One batched float32 eigendecomposition
    per shape; when more than half the spectrum is kept the dropped tail is subtracted instead,
    W - W V_t V_t^T, which needs fewer flops.
    """
    for group, w, tall in tall_stacks(weights):
        shape = tuple(group[0].shape)
        side, keep = min(shape), math.floor(ratio * min(shape))
        if not 0 < ratio <= 1 or keep < 1:
            raise ValueError(f"STr ratio {ratio}: expected (0, 1] keeping at least one of the "
                             f"{side} singular values of a {shape[0]}x{shape[1]} weight")
        if keep == side:
            continue
        with torch.autocast(w.device.type, enabled=False):
            _, vectors = torch.linalg.eigh(w.mT @ w)  # ascending eigenvalues
            if keep <= side // 2:
                kept = vectors[..., side - keep:]
                trimmed = (w @ kept) @ kept.mT
            else:
                tail = vectors[..., :side - keep]
                trimmed = w - (w @ tail) @ tail.mT
        for target, new in zip(group, trimmed if tall else trimmed.mT, strict=True):
            target.copy_(new)
