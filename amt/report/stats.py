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

Training seeds (``train.seeds``). With one seed the interval covers the test episodes only.
With S > 1 seeds every seed is evaluated on the same stored episodes, a crossed design: the
cell's value is the mean over every (seed, episode), and its interval adds in quadrature the
episode interval, 1.96 · std(ē_e) / √E over the per-episode means across seeds, and the
between-seed interval, t(S−1) · std(ā_s) / √S over the per-seed means across episodes (both with
the configured ddof). Under the two-way random-effects model a = μ + s + e + (se), the variance of
the grand mean is σ_s²/S + σ_e²/E + σ_se²/(SE); the two sample variances estimate
σ_s² + σ_se²/E and σ_e² + σ_se²/S, so the sum counts the interaction twice: conservative by that
term, exact when it is zero. Student's t for the seed part because S is small (t(2) = 4.30 for
three seeds): a seed-to-seed spread then widens the interval as it should.

A paired difference between two methods uses the (seed, episode) pairs both were evaluated on
(stored test episodes are shared, so method A's episode i of seed s and method B's are the same
task and the same training seed): the same interval of the differences a − b over the
intersection, with a warning when the two sets differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from amt.specs import StatsOptions

log = logging.getLogger(__name__)

Z95 = 1.96
DEFAULT = StatsOptions()


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% CI half-width, from n (seed, episode) values over ``seeds`` training
    seeds (fractions, not %)."""

    mean: float
    ci: float
    n: int
    seeds: int = 1


@dataclass(frozen=True)
class PairedDifference(Estimate):
    """mean(a − b) ± CI over the n shared (seed, episode) pairs; how many each side had alone."""

    only_a: int = 0
    only_b: int = 0


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


def crossed_estimate(frame: pd.DataFrame, value: str = "accuracy",
                     stats: StatsOptions = DEFAULT) -> Estimate:
    """Mean ± CI of ``value`` over the rows of one cell, each a (``seed``, ``episode``): the
    episode interval alone for one seed, with the between-seed interval in quadrature for
    several (module docstring)."""
    seeds = frame["seed"].nunique() if "seed" in frame else 1
    if seeds == 1:
        return mean_ci(frame[value].to_numpy(), stats)
    per_episode = frame.groupby("episode")[value].mean().to_numpy()
    per_seed = frame.groupby("seed")[value].mean().to_numpy()
    episodes = Z95 * _std(per_episode, stats) / math.sqrt(len(per_episode))
    between = float(student_t.ppf(0.975, seeds - 1)) * _std(per_seed, stats) / math.sqrt(seeds)
    return Estimate(float(frame[value].mean()), math.hypot(episodes, between), len(frame), seeds)


def mean_of_means(estimates: Sequence[Estimate], stats: StatsOptions = DEFAULT) -> Estimate:
    """Average of per-domain estimates, CI √(Σ ci²) / D (pooled) or mean(ci) (mean); n sums
    the values; the seeds are the fewest any domain has."""
    if not estimates:
        raise ValueError("mean_of_means: expected at least one estimate")
    means = np.array([e.mean for e in estimates])
    cis = np.array([e.ci for e in estimates])
    ci = np.sqrt(np.sum(cis**2)) / len(cis) if stats.average_ci == "pooled" else cis.mean()
    return Estimate(float(means.mean()), float(ci), int(sum(e.n for e in estimates)),
                    min(e.seeds for e in estimates))


def paired_difference(a: pd.Series, b: pd.Series, label: str = "",
                      stats: StatsOptions = DEFAULT) -> PairedDifference:
    """mean(a − b) ± CI over the (seed, episode) pairs (the index) present in both; warns when
    the sets differ."""
    for name, series in (("a", a), ("b", b)):
        if not series.index.is_unique:
            raise ValueError(f"paired_difference {label}: episodes of {name} are not unique "
                             "(per seed)")
    shared = a.index.intersection(b.index)
    only_a, only_b = len(a.index.difference(b.index)), len(b.index.difference(a.index))
    if len(shared) == 0:
        raise ValueError(f"paired_difference {label}: the two methods share no episode "
                         f"({len(a)} vs {len(b)} episodes)")
    if only_a or only_b:
        log.warning("paired difference %s: episode sets differ (%d only in the first, %d only in "
                    "the second); paired on the %d shared episodes", label, only_a, only_b,
                    len(shared))
    diff = (a.loc[shared] - b.loc[shared]).rename("difference").reset_index()
    found = crossed_estimate(diff, "difference", stats)
    return PairedDifference(found.mean, found.ci, found.n, found.seeds, only_a, only_b)


def summarise(frame: pd.DataFrame, by: Sequence[str], value: str = "accuracy",
              stats: StatsOptions = DEFAULT) -> pd.DataFrame:
    """One row per group of ``by`` with mean, ci, n and seeds of ``value`` (rows: one per
    (seed, episode))."""
    found = [(key if isinstance(key, tuple) else (key,), crossed_estimate(rows, value, stats))
             for key, rows in frame.groupby(list(by), sort=False, observed=True)]
    return pd.DataFrame([{**dict(zip(by, key, strict=True)), "mean": e.mean, "ci": e.ci,
                          "n": e.n, "seeds": e.seeds} for key, e in found],
                        columns=[*by, "mean", "ci", "n", "seeds"])
