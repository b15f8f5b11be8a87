"""Episode statistics as few-shot papers report them.

Mean ± 95% confidence interval over test episodes: ``1.96 · std / √n`` with the population
standard deviation (``np.std``, ddof=0), exactly as PMF (hushell/pmf_cvpr22) and the
Meta-Dataset code compute it. With ddof=0 the interval is slightly narrower than the textbook
ddof=1 one (by a factor √((n-1)/n), 0.08% at 600 episodes).

An average over domains (the in-domain and out-of-domain averages) is the plain mean of the
per-domain means; its interval treats the domains as independent samples:
``√(Σ ci_d²) / D`` (each ci_d already carries its own 1.96 · std_d / √n_d).

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

log = logging.getLogger(__name__)

Z95 = 1.96
STD_DDOF = 0  # np.std's default, as PMF and Meta-Dataset


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


def mean_ci(values: Sequence[float] | np.ndarray) -> Estimate:
    """Mean ± 1.96 · std(ddof=0) / √n of per-episode values."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_ci: expected a non-empty 1-D sequence, got shape {array.shape}")
    ci = Z95 * float(np.std(array, ddof=STD_DDOF)) / math.sqrt(array.size)
    return Estimate(float(array.mean()), ci, int(array.size))


def mean_of_means(estimates: Sequence[Estimate]) -> Estimate:
    """Average of independent per-domain estimates, CI √(Σ ci²) / D; n sums the episodes."""
    if not estimates:
        raise ValueError("mean_of_means: expected at least one estimate")
    means = np.array([e.mean for e in estimates])
    cis = np.array([e.ci for e in estimates])
    return Estimate(float(means.mean()), float(np.sqrt(np.sum(cis**2)) / len(estimates)),
                    int(sum(e.n for e in estimates)))


def paired_difference(a: pd.Series, b: pd.Series, label: str = "") -> PairedDifference:
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
    diff = mean_ci(a.loc[shared].to_numpy() - b.loc[shared].to_numpy())
    return PairedDifference(diff.mean, diff.ci, diff.n, only_a, only_b)


def summarise(frame: pd.DataFrame, by: Sequence[str], value: str = "accuracy") -> pd.DataFrame:
    """One row per group of ``by`` with mean, ci, n of ``value`` (rows = episodes)."""
    grouped = frame.groupby(list(by), sort=False, observed=True)[value]
    out = grouped.agg(mean="mean", std=lambda v: np.std(v.to_numpy(), ddof=STD_DDOF),
                      n="count").reset_index()
    out["ci"] = Z95 * out.pop("std") / np.sqrt(out["n"])
    return out[[*by, "mean", "ci", "n"]]
