"""The tidy results and spectra formats: loader, validation and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_results, synthetic_spectra

from amt.report.results import condition_label, condition_slug
from amt.rows import (
    COLUMNS,
    ResultsError,
    load_results,
    load_spectra,
    require_results,
    validate_results,
)


@pytest.fixture
def results_csv(tmp_path: Path) -> Path:
    path = tmp_path / "job.csv"
    synthetic_results(episodes=3).to_csv(path, index=False)
    return path


def _rewrite(path: Path, change) -> Path:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = change(frame)
    out = path.with_name("changed.csv")
    frame.to_csv(out, index=False)
    return out


# -- loading --------------------------------------------------------------------------------------
def test_load_round_trip_keeps_types_and_values(results_csv: Path) -> None:
    expected = synthetic_results(episodes=3)
    loaded = load_results([results_csv])
    require_results(loaded)
    assert loaded.dtypes["in_domain"] == np.bool_ and loaded.dtypes["episode"] == np.int64
    pd.testing.assert_frame_equal(loaded[list(COLUMNS)], expected[list(COLUMNS)],
                                  check_dtype=False)


def test_load_concatenates_files(tmp_path: Path) -> None:
    frame = synthetic_results(episodes=2)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    frame[frame.method == "pm"].to_csv(a, index=False)
    frame[frame.method != "pm"].to_csv(b, index=False)
    assert len(load_results([a, b])) == len(frame)


def test_missing_column_is_named(results_csv: Path) -> None:
    changed = _rewrite(results_csv, lambda f: f.drop(columns=["eps", "seed"]))
    with pytest.raises(ResultsError, match=r"changed\.csv: missing column\(s\) \['eps', 'seed'\]"):
        load_results([changed])


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("accuracy", "high", "a finite number"),
    ("accuracy", "1.2", r"a fraction in \[0, 1\]"),
    ("episode", "2.5", "an integer"),
    ("in_domain", "yes", "a boolean"),
    ("method", "", "a non-empty string"),
    ("norm", "l1", "one of"),
    ("eps", "0.5", "0 for clean rows"),
])
def test_bad_value_names_file_column_line_and_value(results_csv: Path, column: str, value: str,
                                                    expected: str) -> None:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[1, column] = value  # a clean row
        return frame

    changed = _rewrite(results_csv, change)
    with pytest.raises(ResultsError, match=rf"changed\.csv: column '{column}', line\(s\) 3: "
                                           rf"values \['{value}'\]; expected {expected}"):
        load_results([changed])


def test_corruption_needs_a_severity(results_csv: Path) -> None:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[frame.index[frame.norm == "corruption"][0], "eps"] = "7"
        return frame

    with pytest.raises(ResultsError, match=r"column 'eps'.*severity in \[1, 2, 3, 4, 5\]"):
        load_results([_rewrite(results_csv, change)])


def test_duplicate_key_within_a_file_names_key_and_lines(results_csv: Path) -> None:
    changed = _rewrite(results_csv, lambda f: pd.concat([f, f.head(1)]))
    with pytest.raises(ResultsError, match=r"changed\.csv: 2 rows share a key, e.g. .*'method': "
                                           r"'pm'.*on lines 2, \d+"):
        load_results([changed])


def test_duplicate_key_across_files_names_both_files(tmp_path: Path, results_csv: Path) -> None:
    other = tmp_path / "other.csv"
    pd.read_csv(results_csv).head(1).to_csv(other, index=False)
    with pytest.raises(ResultsError, match=r"results files \[.*job\.csv', .*other\.csv'\] both "
                                           r"hold key"):
        load_results([results_csv, other])


def test_in_domain_must_agree_per_domain(results_csv: Path) -> None:
    changed = _rewrite(results_csv, lambda f: f.assign(in_domain=["False"] + list(f.in_domain[1:])))
    with pytest.raises(ResultsError, match=r"in_domain' is both true and false.*'glyphs'"):
        load_results([changed])


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty, header = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(ResultsError, match="empty.csv: empty file"):
        load_results([empty])
    with pytest.raises(ResultsError, match="header.csv: no rows"):
        load_results([header])


def test_in_memory_frame_with_gap_is_rejected() -> None:
    frame = synthetic_results(episodes=1)
    frame.loc[2, "accuracy"] = np.nan
    with pytest.raises(ResultsError, match=r"column 'accuracy', line\(s\) 4.*empty cell"):
        validate_results(frame)


def test_require_results_rejects_untyped_frame(results_csv: Path) -> None:
    with pytest.raises(ResultsError, match=r"\['in_domain', 'episode', 'eps', 'accuracy', 'seed'\]"
                                           r" are not typed"):
        require_results(pd.read_csv(results_csv, dtype=str))


# -- spectra --------------------------------------------------------------------------------------
def test_spectra_round_trip_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "spectra.csv"
    synthetic_spectra().to_csv(path, index=False)
    assert len(load_spectra([path])) == len(synthetic_spectra())
    unsorted = synthetic_spectra()
    unsorted.loc[1, "singular_value"] = 99.0
    unsorted.to_csv(path, index=False)
    with pytest.raises(ResultsError, match=r"spectra.csv: column 'singular_value' increases.*"
                                           r"'index': 1"):
        load_spectra([path])
    unsorted.drop(columns="layer").to_csv(path, index=False)
    with pytest.raises(ResultsError, match=r"missing column\(s\) \['layer'\]"):
        load_spectra([path])


# -- labels ---------------------------------------------------------------------------------------
def test_condition_labels() -> None:
    assert condition_label("pgd", "linf", 2 / 255) == "PGD ℓ∞ ε=2/255"
    assert condition_slug("pgd", "linf", 2 / 255) == "pgd_linf_2-255"
    assert condition_label("apgd_ce", "l2", 0.5) == "APGD-CE ℓ2 ε=0.5"
    assert condition_label("gaussian_noise", "corruption", 3.0) == "gaussian noise s3"
    assert condition_slug("none", "none", 0.0) == "clean"
