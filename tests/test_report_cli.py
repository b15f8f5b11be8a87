"""``python -m amt report`` as the workflow calls it: files in, tables and figures out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from amt.report import register


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amt")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_report_writes_tables_and_figures(tmp_path: Path, report_inputs) -> None:
    jobs, spectra = report_inputs
    args = _parser().parse_args(
        ["report", "--results", *map(str, jobs), "--spectra", str(spectra),
         "--tables-dir", str(tmp_path / "tables"), "--figures-dir", str(tmp_path / "figures"),
         "--reference-methods", "pm"])
    assert args.func(args) == 0
    tables = {p.name for p in (tmp_path / "tables").iterdir()}
    assert {"tables.md", "clean_bscd_dino_5w5s_clean.md",
            "adversarial_bscd_dino_5w5s_pgd_linf_4-255.tex",
            "difference_vs_pm_bscd_dino_5w5s_pgd_linf_2-255.csv"} <= tables
    assert not any(name.startswith("difference_vs_lora") for name in tables)
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {f"{stem}.{ext}" for ext in ("png", "pdf")
                       for stem in ("clean_vs_adv_bscd_dino_5w5s",
                                    "eps_curve_bscd_dino_5w5s_pgd_linf", "spectra_mnist")}


def test_report_fails_cleanly_on_a_bad_file(tmp_path: Path, report_inputs,
                                            caplog: pytest.LogCaptureFixture) -> None:
    jobs, _ = report_inputs
    bad = tmp_path / "bad.csv"
    bad.write_text(jobs[0].read_text().replace("accuracy", "acc", 1))
    args = _parser().parse_args(["report", "--results", str(bad), "--tables-dir",
                                 str(tmp_path / "t"), "--figures-dir", str(tmp_path / "f")])
    with caplog.at_level(logging.ERROR):
        assert args.func(args) == 1
    assert "bad.csv: missing column(s) ['accuracy']" in caplog.text
    assert not (tmp_path / "t").exists()


def test_report_requires_results_and_directories() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["report", "--tables-dir", "t", "--figures-dir", "f"])


def test_report_refuses_a_repeated_reference(tmp_path: Path, report_inputs,
                                             caplog: pytest.LogCaptureFixture) -> None:
    jobs, _ = report_inputs
    args = _parser().parse_args(["report", "--results", *map(str, jobs), "--tables-dir",
                                 str(tmp_path / "t"), "--figures-dir", str(tmp_path / "f"),
                                 "--reference-methods", "lora", "lora"])
    with caplog.at_level(logging.ERROR):
        assert args.func(args) == 1
    assert "reference methods ['lora', 'lora']: expected one or more, each once" in caplog.text
    assert not (tmp_path / "t").exists()


def test_report_takes_the_statistics_options(tmp_path: Path, report_inputs,
                                             caplog: pytest.LogCaptureFixture) -> None:
    jobs, _ = report_inputs
    out = ["--tables-dir", str(tmp_path / "t"), "--figures-dir", str(tmp_path / "f")]
    args = _parser().parse_args(["report", "--results", *map(str, jobs), *out,
                                 "--std-ddof", "0", "--average-ci", "mean"])
    assert args.func(args) == 0
    assert "std of ddof=0" in (tmp_path / "t" / "tables.md").read_text()
    args = _parser().parse_args(["report", "--results", *map(str, jobs), *out,
                                 "--std-ddof", "2"])
    with caplog.at_level(logging.ERROR):
        assert args.func(args) == 1
    assert "std_ddof=2: expected 0 or 1" in caplog.text
