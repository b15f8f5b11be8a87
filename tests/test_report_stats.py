"""Episode statistics: mean ± 95% CI (ddof 1 or 0), training seeds, domain averages and paired
differences."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_results

from amt.report.stats import (
    Estimate,
    crossed_estimate,
    mean_ci,
    mean_of_means,
    paired_difference,
    summarise,
)
from amt.report.tables import build_tables
from amt.rows import validate_results
from amt.specs import StatsOptions

POPULATION = StatsOptions(std_ddof=0)
MEAN_CI = StatsOptions(average_ci="mean")


def test_mean_ci_by_hand_with_either_std() -> None:
    """[0.2, 0.4, 0.9]: mean 0.5, squared deviations 0.09 + 0.01 + 0.16 = 0.26; ddof=1 std
    sqrt(0.13) (the release's and PMF's torch.std), ddof=0 sqrt(0.26 / 3)."""
    unbiased, population = mean_ci([0.2, 0.4, 0.9]), mean_ci([0.2, 0.4, 0.9], POPULATION)
    assert unbiased.mean == population.mean == pytest.approx(0.5)
    assert unbiased.ci == pytest.approx(1.96 * math.sqrt(0.13) / math.sqrt(3))
    assert population.ci == pytest.approx(1.96 * math.sqrt(0.26 / 3) / math.sqrt(3))
    assert (unbiased.ci, population.ci) == pytest.approx((0.408007, 0.333136), abs=1e-6)


def test_mean_ci_matches_numpy() -> None:
    values = np.random.default_rng(0).uniform(0, 1, 37)
    estimate = mean_ci(values)
    assert estimate.n == 37
    assert estimate.mean == pytest.approx(values.mean())
    assert estimate.ci == pytest.approx(1.96 * np.std(values, ddof=1) / math.sqrt(37))
    assert mean_ci(values, POPULATION).ci == pytest.approx(1.96 * np.std(values) / math.sqrt(37))


def test_mean_ci_of_one_value_and_of_nothing() -> None:
    assert mean_ci([0.4]) == mean_ci([0.4], POPULATION) == Estimate(0.4, 0.0, 1)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_ci([])


def test_summarise_agrees_with_mean_ci_per_group() -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"method": np.repeat(["a", "b"], 20),
                          "domain": np.tile(np.repeat(["x", "y"], 10), 2),
                          "accuracy": rng.uniform(0, 1, 40)})
    summary = summarise(frame, ["method", "domain"])
    assert len(summary) == 4
    for row in summary.itertuples(index=False):
        values = frame.accuracy[(frame.method == row.method) & (frame.domain == row.domain)]
        expected = mean_ci(values.to_numpy())
        assert (row.mean, row.ci, row.n) == pytest.approx((expected.mean, expected.ci, 10))


def test_mean_of_means_propagates_independent_cis() -> None:
    average = mean_of_means([Estimate(0.5, 0.03, 10), Estimate(0.7, 0.04, 20)])
    assert average.mean == pytest.approx(0.6)
    assert average.ci == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2 = 0.05 / 2
    assert average.n == 30


def test_mean_of_means_with_the_releases_mean_of_cis() -> None:
    average = mean_of_means([Estimate(0.5, 0.03, 10), Estimate(0.7, 0.04, 20)], MEAN_CI)
    assert (average.mean, average.ci, average.n) == pytest.approx((0.6, 0.035, 30))


def test_paired_difference_on_shared_episodes(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    a = pd.Series(rng.uniform(0, 1, 12), index=range(12))
    b = pd.Series(rng.uniform(0, 1, 10), index=range(3, 13))  # episodes 3..12
    with caplog.at_level(logging.WARNING):
        diff = paired_difference(a, b, "amt vs pm")
    shared = list(range(3, 12))
    expected = a[shared].to_numpy() - b[shared].to_numpy()
    assert (diff.n, diff.only_a, diff.only_b) == (9, 3, 1)
    assert diff.mean == pytest.approx(expected.mean())
    assert diff.ci == pytest.approx(1.96 * np.std(expected, ddof=1) / 3)
    assert paired_difference(a, b, stats=POPULATION).ci == \
        pytest.approx(1.96 * np.std(expected) / 3)
    assert "amt vs pm: episode sets differ (3 only in the first, 1 only in the second)" \
        in caplog.text


def test_paired_difference_pairs_by_episode_not_position(caplog: pytest.LogCaptureFixture) -> None:
    a = pd.Series([0.1, 0.9, 0.5], index=[0, 1, 2])
    b = pd.Series([0.5, 0.1, 0.9], index=[2, 0, 1])  # same values, shuffled order
    with caplog.at_level(logging.WARNING):
        diff = paired_difference(a, b)
    assert (diff.mean, diff.ci, diff.n) == (0.0, 0.0, 3)
    assert caplog.text == ""


def test_pairing_narrows_the_interval_for_correlated_methods() -> None:
    rng = np.random.default_rng(3)
    hardness = rng.uniform(0.3, 0.9, 200)
    a = pd.Series(hardness + rng.normal(0.05, 0.02, 200))
    b = pd.Series(hardness)
    assert paired_difference(a, b).ci < 0.25 * mean_ci(a.to_numpy()).ci


def test_paired_difference_errors() -> None:
    with pytest.raises(ValueError, match="x: the two methods share no episode"):
        paired_difference(pd.Series([0.1], index=[0]), pd.Series([0.2], index=[1]), "x")
    with pytest.raises(ValueError, match="episodes of a are not unique"):
        paired_difference(pd.Series([0.1, 0.2], index=[0, 0]), pd.Series([0.2], index=[0]))


def _seeded(offsets: list[float], episodes: int = 10) -> pd.DataFrame:
    """accuracy = an episode's difficulty + its seed's offset: a known seed effect."""
    base = np.linspace(0.3, 0.8, episodes)
    return pd.DataFrame([{"seed": s, "episode": e, "accuracy": base[e] + off}
                         for s, off in enumerate(offsets) for e in range(episodes)])


def test_several_seeds_add_the_between_seed_interval_to_the_episode_interval():
    flat, spread = crossed_estimate(_seeded([0, 0, 0])), crossed_estimate(_seeded([-0.1, 0, 0.1]))
    base = np.linspace(0.3, 0.8, 10)
    episodes = 1.96 * np.std(base, ddof=1) / np.sqrt(10)
    between = 4.302653 * 0.1 / np.sqrt(3)  # t(2, 0.975) * std([-.1, 0, .1], ddof=1) / sqrt(3)
    assert (flat.seeds, flat.n) == (3, 30) and flat.ci == pytest.approx(episodes, rel=1e-6)
    assert spread.ci == pytest.approx(np.hypot(episodes, between), rel=1e-6)
    assert spread.mean == pytest.approx(base.mean()) and spread.ci > flat.ci
    one = crossed_estimate(_seeded([0.1]))  # one seed: the episode interval alone
    assert one.seeds == 1 and one.ci == pytest.approx(episodes, rel=1e-6)


def test_paired_differences_pair_on_seed_and_episode():
    a = _seeded([-0.1, 0, 0.1]).set_index(["seed", "episode"])["accuracy"]
    b = a - 0.05  # the same seed effect: it cancels in every (seed, episode) pair
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(0.05) and diff.ci == pytest.approx(0, abs=1e-12)
    assert diff.seeds == 3 and diff.n == 30
    shuffled = b.sample(frac=1, random_state=0)  # pairing is by index, not position
    assert paired_difference(a, shuffled).ci == pytest.approx(0, abs=1e-12)


def test_tables_say_how_many_seeds_they_average(tmp_path):
    rows = synthetic_results(episodes=4)
    three = pd.concat([rows.assign(seed=s, accuracy=(rows.accuracy + 0.02 * s).clip(0, 1))
                       for s in range(3)])
    build_tables(validate_results(three), tmp_path)
    index = (tmp_path / "tables.md").read_text()
    assert "averaged over 3 training seeds" in index and "Student's t" in index
    assert "; 3 seeds" in (tmp_path / "clean_builtin_dino_5w1s_clean.md").read_text()
    build_tables(rows, tmp_path / "one")
    assert "one training seed: the interval covers the test episodes only" in \
        (tmp_path / "one" / "tables.md").read_text()
