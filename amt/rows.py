"""The tidy results format: one CSV row per evaluated (domain, method, condition, episode).

The evaluation jobs write it; the report reads it.

Columns (``COLUMNS``, every one required; extra columns are kept untouched):

| column | type | meaning |
|---|---|---|
| benchmark | str | builtin, meta_dataset, bscd, fine_grained or any name |
| domain | str | target domain |
| in_domain | bool | the domain is the meta-training source (true/false/1/0) |
| backbone | str | e.g. dino |
| method | str | a method of the registry (``amt.registry.METHODS``) |
| setting | str | 5w1s, 5w5s, vary, ... |
| episode | int >= 0 | index into the stored test episodes, shared by every method |
| attack | str | none, pgd, apgd_ce, apgd_t, autoattack, noise, or a corruption (contrast, ...) |
| norm | str | none, linf, l2 or corruption |
| eps | float | 0 when clean; the budget for linf/l2 (> 0); the severity 1..5 for corruptions |
| accuracy | float in [0, 1] | fraction of the episode's queries classified correctly |
| seed | int | the training seed of the evaluated model (``train.seeds``), its evaluation's too |
| config_hash | str | hash of the configuration that produced the row |

``KEY`` identifies a row; ``load_results`` rejects duplicate keys within and across files.
A condition is one (attack, norm, eps): clean (attack and norm none), adversarial (norm linf or
l2) or corruption (norm corruption, eps the severity).

Spectra (``SPECTRA_COLUMNS``, ``load_spectra``): singular values of merged weights, one row per
(domain, method, layer, index) with ``singular_value`` >= 0, non-increasing in ``index`` within a
(domain, method, layer) as an SVD returns them. ``layer`` is the module name, e.g.
``blocks.3.attn.qkv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from amt.registry import SEVERITIES

log = logging.getLogger(__name__)

COLUMNS: dict[str, str] = {
    "benchmark": "str", "domain": "str", "in_domain": "bool", "backbone": "str", "method": "str",
    "setting": "str", "episode": "int", "attack": "str", "norm": "str", "eps": "float",
    "accuracy": "float", "seed": "int", "config_hash": "str",
}
KEY: tuple[str, ...] = ("benchmark", "domain", "backbone", "method", "setting", "seed",
                        "episode", "attack", "norm", "eps")
GROUP: tuple[str, ...] = ("benchmark", "backbone", "setting")  # one table or figure set each
CONDITION: tuple[str, ...] = ("attack", "norm", "eps")
NORMS = ("none", "linf", "l2", "corruption")
ADVERSARIAL_NORMS = ("linf", "l2")
SPECTRA_COLUMNS: dict[str, str] = {"domain": "str", "method": "str", "layer": "str",
                                   "index": "int", "singular_value": "float"}
SPECTRA_KEY: tuple[str, ...] = ("domain", "method", "layer", "index")
_TRUE, _FALSE = {"true", "1"}, {"false", "0"}
_INT = r"[+-]?\d+"
_SHOWN = 5  # offending values quoted per error

class ResultsError(ValueError):
    """A results or spectra file does not follow its tidy format."""


# -- parsing --------------------------------------------------------------------------------------
def _lines(mask: pd.Series) -> str:
    """CSV line numbers (header is line 1) of the rows flagged in ``mask``."""
    rows = np.flatnonzero(mask.to_numpy())
    shown = ", ".join(str(r + 2) for r in rows[:_SHOWN])
    return shown + (f" (+{len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else "")


def _fail(source: str, column: str, raw: pd.Series, mask: pd.Series, expected: str) -> None:
    values = list(dict.fromkeys(raw[mask].astype(str)))[:_SHOWN]
    raise ResultsError(f"{source}: column {column!r}, line(s) {_lines(mask)}: values {values}; "
                       f"expected {expected}")


def _parse_column(raw: pd.Series, column: str, kind: str, source: str) -> pd.Series:
    """Typed column from strings, or ResultsError naming file, column, lines and values."""
    text = raw.astype(str)
    if kind == "str":
        bad = (text.str.strip() == "") | (text != text.str.strip())
        if bad.any():
            _fail(source, column, raw, bad, "a non-empty string without surrounding spaces")
        return text
    if kind == "bool":
        lower = text.str.lower()
        bad = ~lower.isin(_TRUE | _FALSE)
        if bad.any():
            _fail(source, column, raw, bad, "a boolean: true, false, 1 or 0")
        return lower.isin(_TRUE).astype(bool)
    if kind == "int":
        bad = ~text.str.fullmatch(_INT)
        if bad.any():
            _fail(source, column, raw, bad, "an integer")
        return text.astype(np.int64)
    numbers = pd.to_numeric(text, errors="coerce").astype(np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        _fail(source, column, raw, bad, "a finite number")
    return numbers


def _check_range(frame: pd.DataFrame, raw: pd.DataFrame, source: str) -> None:
    checks = [
        ("accuracy", (frame.accuracy < 0) | (frame.accuracy > 1), "a fraction in [0, 1]"),
        ("episode", frame.episode < 0, "an index >= 0"),
        ("norm", ~frame.norm.isin(NORMS), f"one of {list(NORMS)}"),
        ("norm", (frame.attack == "none") != (frame.norm == "none"),
         "'none' exactly when attack is 'none'"),
        ("eps", (frame.norm == "none") & (frame.eps != 0), "0 for clean rows (norm none)"),
        ("eps", frame.norm.isin(ADVERSARIAL_NORMS) & (frame.eps <= 0),
         "a budget > 0 for norm linf or l2"),
        ("eps", (frame.norm == "corruption") & ~frame.eps.isin(SEVERITIES),
         f"a severity in {list(SEVERITIES)} for norm corruption"),
    ]
    for column, bad, expected in checks:
        if bad.any():
            _fail(source, column, raw[column], bad, expected)


def _check_in_domain(frame: pd.DataFrame, source: str) -> None:
    flags = frame.groupby(["benchmark", "domain"], sort=False)["in_domain"].nunique()
    mixed = flags[flags > 1]
    if len(mixed):
        raise ResultsError(f"{source}: column 'in_domain' is both true and false for "
                           f"(benchmark, domain) {list(mixed.index)[:_SHOWN]}; expected one value "
                           "per domain")


def _check_duplicates(frame: pd.DataFrame, key: Sequence[str], source: str) -> None:
    duplicated = frame.duplicated(list(key), keep=False)
    if duplicated.any():
        first = frame.loc[duplicated, list(key)].iloc[0].to_dict()
        raise ResultsError(f"{source}: {int(duplicated.sum())} rows share a key, e.g. {first} on "
                           f"lines {_lines(duplicated)}; expected one row per {list(key)}")


def _parse_table(raw: pd.DataFrame, columns: dict[str, str], key: Sequence[str],
                 source: str) -> pd.DataFrame:
    """Typed copy of a table of strings: columns present, cells parsed, keys unique."""
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise ResultsError(f"{source}: missing column(s) {missing}; expected {list(columns)}")
    if raw.empty:
        raise ResultsError(f"{source}: no rows")
    frame = raw.copy()
    for column, kind in columns.items():
        frame[column] = _parse_column(raw[column], column, kind, source)
    _check_duplicates(frame, key, source)
    return frame


def parse_results(raw: pd.DataFrame, source: str) -> pd.DataFrame:
    """Typed, validated copy of a results table whose cells are strings (as read from CSV)."""
    raw = raw.reset_index(drop=True)
    frame = _parse_table(raw, COLUMNS, KEY, source)
    _check_range(frame, raw, source)
    _check_in_domain(frame, source)
    return frame


def validate_results(frame: pd.DataFrame, source: str = "results frame") -> pd.DataFrame:
    """Typed, validated copy of an in-memory results table (any cell types)."""
    present = [c for c in COLUMNS if c in frame.columns]
    empty = frame[present].isna()
    if empty.any().any():
        column = empty.any().idxmax()
        _fail(source, column, frame[column], empty[column], "a value (found an empty cell)")
    return parse_results(frame.astype({c: str for c in present}), source)


def read_tidy_csv(path: Path) -> pd.DataFrame:
    """Every cell as a string, nothing turned into NaN, so validation sees what the file holds."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError as error:
        raise ResultsError(f"{path}: empty file; expected a CSV header and rows") from error


def _concat(frames: list[pd.DataFrame], paths: list[Path], key: Sequence[str],
            what: str) -> pd.DataFrame:
    """Frames of several files as one; a key held by two files names both files."""
    if not frames:
        raise ResultsError(f"no {what} files given")
    merged = pd.concat([f.assign(_file=str(p)) for f, p in zip(frames, paths, strict=True)],
                       ignore_index=True)
    duplicated = merged.duplicated(list(key), keep=False)
    if duplicated.any():
        clash = merged[duplicated]
        first = clash[list(key)].iloc[0]
        files = clash.loc[(clash[list(key)] == first).all(axis=1), "_file"].unique().tolist()
        raise ResultsError(f"{what} files {files} both hold key {first.to_dict()}; expected each "
                           f"{list(key)} in exactly one file")
    return merged.drop(columns="_file")


def load_results(paths: Iterable[Path | str]) -> pd.DataFrame:
    """Concatenate and validate results CSVs; duplicate keys across files name both files."""
    paths = [Path(p) for p in paths]
    merged = _concat([parse_results(read_tidy_csv(p), str(p)) for p in paths], paths, KEY,
                     "results")
    _check_in_domain(merged, "results files " + ", ".join(map(str, paths)))
    log.info("loaded %d result rows from %d file(s)", len(merged), len(paths))
    return merged


def parse_spectra(raw: pd.DataFrame, source: str) -> pd.DataFrame:
    """Typed, validated copy of a spectra table whose cells are strings."""
    raw = raw.reset_index(drop=True)
    frame = _parse_table(raw, SPECTRA_COLUMNS, SPECTRA_KEY, source)
    for column in ("index", "singular_value"):
        if (frame[column] < 0).any():
            _fail(source, column, raw[column], frame[column] < 0, "a value >= 0")
    ordered = frame.sort_values([*SPECTRA_KEY])
    rises = ordered.groupby(["domain", "method", "layer"], sort=False)["singular_value"].diff() > 0
    if rises.any():
        first = ordered.loc[rises.idxmax(), list(SPECTRA_KEY)].to_dict()
        raise ResultsError(f"{source}: column 'singular_value' increases with 'index' at "
                           f"{first}; expected each layer's values sorted largest first")
    return frame


def load_spectra(paths: Iterable[Path | str]) -> pd.DataFrame:
    """Concatenate and validate spectra CSVs; a key held by two files names both files."""
    paths = [Path(p) for p in paths]
    return _concat([parse_spectra(read_tidy_csv(p), str(p)) for p in paths], paths, SPECTRA_KEY,
                   "spectra")


def require_results(frame: pd.DataFrame) -> None:
    """Cheap check that a frame came through ``load_results``/``validate_results``."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"results frame: missing column(s) {missing}")
    expected = {"bool": pd.api.types.is_bool_dtype, "int": pd.api.types.is_integer_dtype,
                "float": pd.api.types.is_float_dtype}
    wrong = [c for c, kind in COLUMNS.items()
             if kind in expected and not expected[kind](frame[c])]
    if wrong:
        raise ResultsError(f"results frame: column(s) {wrong} are not typed; pass the frame "
                           "through load_results or validate_results first")


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename over it: a killed job never
    leaves a CSV that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
