"""Episode statistics as few-shot papers report them, with the report's options
(``amt.specs.StatsOptions``, config key ``report``).

Mean ± 95% confidence interval over test episodes: ``1.96 · std / √n``. The std is the unbiased
one (ddof=1) by default, as the AMT release and PMF compute it (``torch.tensor(...).std()``:
AMT utils/deit_util.py:60-62, test_meta_dataset.py:186-187; PMF the same files); ddof=0
(``np.std``'s default) gives an interval narrower by √((n-1)/n), 0.08% at 600 episodes.

An average over domains (the in-domain and out-of-domain averages) is the plain mean of the
per-domain means. Its interval: ``pooled`` treats the domains as independent samples,
``√(Σ ci_d²) / D`` (each ci_d already carries its own 1.96 · std_d / √n_d); ``mean`` is the
mean of the per-domain intervals, as the release prints its averages (AMT:
test_meta_dataset.py:179-208), wider by up to √D.

A paired difference between two methods uses the episodes both were evaluated on (stored test
episodes are shared, so method A's episode i and method B's episode i are the same task):
mean(a_i − b_i) ± 1.96 · std(a_i − b_i) / √n over the intersection, with a warning when the two
episode sets differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from amt.specs import StatsOptions

log = logging.getLogger(__name__)

Z95 = 1.96
DEFAULT = StatsOptions()


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% CI half-width, from n episodes (fractions, not %)."""

    mean: float
    ci: float
    n: int


@dataclass(frozen=True)
class PairedDifference(Estimate):
    """mean(a − b) ± CI over the n shared episodes; how many each side had alone."""

    only_a: int
    only_b: int


def _std(values: np.ndarray, stats: StatsOptions) -> float:
    """The episodes' std; 0 for a single episode (ddof=1 leaves it undefined)."""
    return float(np.std(values, ddof=stats.std_ddof)) if len(values) > stats.std_ddof else 0.0


def mean_ci(values: Sequence[float] | np.ndarray, stats: StatsOptions = DEFAULT) -> Estimate:
    """Mean ± 1.96 · std(ddof) / √n of per-episode values."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_ci: expected a non-empty 1-D sequence, got shape {array.shape}")
    ci = Z95 * _std(array, stats) / math.sqrt(array.size)
    return Estimate(float(array.mean()), ci, int(array.size))


def mean_of_means(estimates: Sequence[Estimate], stats: StatsOptions = DEFAULT) -> Estimate:
    """Average of per-domain estimates, CI √(Σ ci²) / D (pooled) or mean(ci) (mean); n sums
    the episodes."""
    if not estimates:
        raise ValueError("mean_of_means: expected at least one estimate")
    means = np.array([e.mean for e in estimates])
    cis = np.array([e.ci for e in estimates])
    ci = np.sqrt(np.sum(cis**2)) / len(cis) if stats.average_ci == "pooled" else cis.mean()
    return Estimate(float(means.mean()), float(ci), int(sum(e.n for e in estimates)))


def paired_difference(a: pd.Series, b: pd.Series, label: str = "",
                      stats: StatsOptions = DEFAULT) -> PairedDifference:
    """mean(a − b) ± CI over the episodes (index) present in both; warns when the sets differ."""
    for name, series in (("a", a), ("b", b)):
        if not series.index.is_unique:
            raise ValueError(f"paired_difference {label}: episodes of {name} are not unique")
    shared = a.index.intersection(b.index)
    only_a, only_b = len(a.index.difference(b.index)), len(b.index.difference(a.index))
    if len(shared) == 0:
        raise ValueError(f"paired_difference {label}: the two methods share no episode "
                         f"({len(a)} vs {len(b)} episodes)")
    if only_a or only_b:
        log.warning("paired difference %s: episode sets differ (%d only in the first, %d only in "
                    "the second); paired on the %d shared episodes", label, only_a, only_b,
                    len(shared))
    diff = mean_ci(a.loc[shared].to_numpy() - b.loc[shared].to_numpy(), stats)
    return PairedDifference(diff.mean, diff.ci, diff.n, only_a, only_b)


def summarise(frame: pd.DataFrame, by: Sequence[str], value: str = "accuracy",
              stats: StatsOptions = DEFAULT) -> pd.DataFrame:
    """One row per group of ``by`` with mean, ci, n of ``value`` (rows = episodes)."""
    grouped = frame.groupby(list(by), sort=False, observed=True)[value]
    out = grouped.agg(mean="mean", std=lambda v: _std(v.to_numpy(), stats),
                      n="count").reset_index()
    out["ci"] = Z95 * out.pop("std") / np.sqrt(out["n"])
    return out[[*by, "mean", "ci", "n"]]
