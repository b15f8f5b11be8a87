"""STr: the exact truncation, the release's randomised one and the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from amt.episodes import episode_rng
from amt.trim import trim, trim_, trim_singular_values


def _truncated_svd(w: torch.Tensor, keep: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


@pytest.mark.parametrize(("shape", "ratio"), [((40, 12), 0.25), ((12, 40), 0.75), ((9, 9), 0.5)])
def test_trim_is_the_truncated_svd(shape, ratio):
    torch.manual_seed(0)
    weights = [torch.randn(*shape), torch.randn(*shape)]
    originals = [w.clone() for w in weights]
    trim_(weights, ratio)
    keep = math.floor(ratio * min(shape))
    for w, original in zip(weights, originals, strict=True):
        torch.testing.assert_close(w.double(), _truncated_svd(original, keep), atol=1e-5,
                                   rtol=1e-5)
        assert torch.linalg.matrix_rank(w.double(), rtol=1e-6) == keep
    with pytest.raises(ValueError, match="keeping at least one"):
        trim_([torch.randn(4, 4)], 0.1)


def test_the_float64_reference_keeps_the_best_low_rank_approximation():
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    trimmed = trim_singular_values(w, 0.5)
    assert torch.linalg.matrix_rank(trimmed) == 4
    torch.testing.assert_close(trimmed.double(), _truncated_svd(w, 4), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trim_singular_values(w, 1.0), w, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="STr ratio 0.1"):
        trim_singular_values(w, 0.1)


def test_lowrank_is_the_releases_svd_lowrank_seeded_by_seed_and_episode():
    """torch.svd_lowrank(W, q=k, niter=2) on each weight in order, from a generator fixed by
    (seed, episode); the caller's global generator is left where it was."""
    torch.manual_seed(0)
    weights = [torch.randn(30, 12), torch.randn(12, 20)]
    originals = [w.clone() for w in weights]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    trim(weights, 0.5, "lowrank", seed=7, index=3)
    assert torch.equal(torch.random.get_rng_state(), state)

    torch.manual_seed(int(episode_rng(7, 3, "str").integers(2**62)))
    for w, original in zip(weights, originals, strict=True):
        u, s, v = torch.svd_lowrank(original, q=6, niter=2)  # k = floor(0.5 * 12)
        torch.testing.assert_close(w, u @ torch.diag(s) @ v.T, atol=1e-6, rtol=1e-6)
        assert torch.linalg.matrix_rank(w, rtol=1e-5) == 6

    again = [o.clone() for o in originals]
    trim(again, 0.5, "lowrank", seed=7, index=3)
    assert all(torch.equal(a, w) for a, w in zip(again, weights, strict=True))
    other = [o.clone() for o in originals]
    trim(other, 0.5, "lowrank", seed=7, index=4)
    assert not torch.equal(other[0], weights[0])


def test_lowrank_misses_part_of_the_top_subspace_of_a_flat_spectrum():
    """No oversampling: on a slowly decaying spectrum the randomised rank-k approximation is
    measurably worse than the exact one (the release's 2-46% relative difference)."""
    torch.manual_seed(0)
    w = torch.randn(96, 32)
    exact, randomised = [w.clone()], [w.clone()]
    trim(exact, 0.5, "exact")
    trim(randomised, 0.5, "lowrank", seed=0, index=0)
    best = torch.linalg.norm(w - exact[0])
    assert torch.linalg.norm(w - randomised[0]) > 1.01 * best
    assert torch.linalg.norm(randomised[0] - exact[0]) > 0.02 * torch.linalg.norm(exact[0])
    with pytest.raises(ValueError, match="STr solver 'svd'"):
        trim([w.clone()], 0.5, "svd")
