"""STr, singular value trimming: a merged weight replaced by a rank-k approximation,
k = floor(rho * min(out, in)), each weight as one matrix (the fused qkv too, as the release).

Solvers (registry.STR_SOLVERS):
- ``exact``: the best rank-k approximation, from the eigendecomposition of each weight's smaller
  Gram matrix (float32, batched over the layers of a shape) and a projection onto the kept
  subspace: the truncated SVD's matrix at a fraction of ``torch.linalg.svd``'s cost
  (bench/bench_eval.py measures both).
- ``lowrank``: the release's ``torch.svd_lowrank(W, q=k, niter=2)`` in float32 (AMT:
  models/lora_adsv/layers_merge.py:419-425, 552-558), a randomised range finder with no
  oversampling, so it misses part of the top-k subspace. Its random draws are fixed by
  (seed, episode) and leave torch's global generator as it was.
``trim_singular_values`` is the float64 SVD reference the tests and benchmarks compare with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from amt.episodes import episode_rng


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


def kept_rank(shape: Sequence[int], ratio: float) -> int:
    """floor(ratio * min(out, in)), which must keep at least one singular value."""
    keep = math.floor(ratio * min(shape))
    if not 0 < ratio <= 1 or keep < 1:
        raise ValueError(f"STr ratio {ratio}: expected (0, 1] keeping at least one of the "
                         f"{min(shape)} singular values of a {shape[0]}x{shape[1]} weight")
    return keep


def trim_singular_values(weight: Tensor, ratio: float) -> Tensor:
    """Best rank-floor(ratio * min(out, in)) approximation of ``weight`` (STr), via float64 SVD."""
    keep = kept_rank(weight.shape, ratio)
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)


@torch.no_grad()
def trim(weights: Sequence[Tensor], ratio: float, solver: str = "exact", seed: int = 0,
         index: int = 0) -> None:
    """STr in place with ``solver`` (a registry.STR_SOLVERS name); ``lowrank`` draws from a
    generator fixed by (``seed``, episode ``index``)."""
    if solver == "exact":
        trim_(weights, ratio)
    elif solver == "lowrank":
        lowrank_trim_(weights, ratio, int(episode_rng(seed, index, "str").integers(2**62)))
    else:
        raise ValueError(f"STr solver {solver!r}: expected exact or lowrank")


@torch.no_grad()
def lowrank_trim_(weights: Sequence[Tensor], ratio: float, seed: int) -> None:
    """Each matrix in place by ``torch.svd_lowrank(W, q=k, niter=2)``'s U diag(S) V^T in
    float32, the layers in order, from torch's generator seeded with ``seed`` on the weights'
    device (svd_lowrank takes no generator); the global generators are restored afterwards."""
    if not weights:
        return
    device = weights[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        with torch.autocast(device.type, enabled=False):
            for w in weights:
                u, s, v = torch.svd_lowrank(w.float(), q=kept_rank(w.shape, ratio), niter=2)
                w.copy_((u * s) @ v.mT)


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
        side, keep = min(shape), kept_rank(shape, ratio)
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
