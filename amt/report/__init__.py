"""Tables and figures from tidy evaluation results: ``python -m amt report``.

Modules: ``results`` (the tidy formats and their loaders), ``stats`` (mean ± CI, paired
differences), ``tables`` (table specs and their CSV/Markdown/LaTeX), ``sanity`` (the jobs'
sanity checks in one table), ``figures`` (seaborn), ``training`` (training curves).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from amt.registry import AVERAGE_CIS
from amt.specs import StatsOptions

log = logging.getLogger(__name__)


def cmd_report(args: argparse.Namespace) -> int:
    """Load and validate the results (and spectra), then write every table and figure; 1 when
    an input file is missing or malformed (the log names the file and the problem)."""
    from amt.report.figures import build_figures, build_training_figures
    from amt.report.sanity import load_sanity, write_sanity_table
    from amt.report.tables import REFERENCES, build_tables
    from amt.rows import ResultsError, load_results, load_spectra
    from amt.specs import StatsOptions, build

    try:
        results = load_results(args.results)
        spectra = load_spectra(args.spectra) if args.spectra else None
        sanity = load_sanity(args.sanity) if args.sanity else None
    except (ResultsError, FileNotFoundError) as error:
        log.error("report: %s", error)
        return 1
    try:
        stats = build(StatsOptions, {k: getattr(args, k) for k in ("std_ddof", "average_ci")
                                     if getattr(args, k) is not None}, "report options")
        tables = build_tables(results, args.tables_dir,
                              references=args.reference_methods or REFERENCES, stats=stats)
    except ValueError as error:
        log.error("report: %s", error)
        return 1
    if sanity is not None:
        tables += write_sanity_table(sanity, args.tables_dir)
    figures = build_figures(results, spectra, args.figures_dir, stats)
    if args.training_logs:
        try:
            figures += build_training_figures(args.training_logs, args.results_root,
                                              args.figures_dir, args.validation_logs)
        except (ResultsError, FileNotFoundError) as error:
            log.error("report: %s", error)
            return 1
    log.info("report: %d table files in %s, %d figure files in %s", len(tables),
             args.tables_dir, len(figures), args.figures_dir)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser("report", help="tables and figures from tidy results CSVs")
    parser.add_argument("--results", type=Path, nargs="+", required=True, metavar="CSV",
                        help="tidy results files, one per evaluation job")
    parser.add_argument("--spectra", type=Path, nargs="+", default=[], metavar="CSV",
                        help="singular-value spectra of merged weights (optional)")
    parser.add_argument("--sanity", type=Path, nargs="+", default=[], metavar="JSON",
                        help="the evaluation jobs' sanity files (optional): sanity.csv / .md")
    parser.add_argument("--tables-dir", type=Path, required=True, metavar="DIR")
    parser.add_argument("--figures-dir", type=Path, required=True, metavar="DIR")
    parser.add_argument("--training-logs", type=Path, nargs="+", default=[], metavar="CSV",
                        help="train_log.csv files under --results-root (training curves)")
    parser.add_argument("--validation-logs", type=Path, nargs="*", default=[], metavar="CSV",
                        help="valid_log.csv files of the meta-tuning runs (validation per "
                        "epoch, the kept epoch marked in the training curves)")
    parser.add_argument("--results-root", type=Path, default=Path("results"), metavar="DIR",
                        help="what the training logs' folders are named relative to")
    parser.add_argument("--reference-methods", nargs="+", metavar="METHOD",
                        help="methods the paired-difference tables subtract, one set of tables "
                        "each (default: the baselines pm and lora)")
    parser.add_argument("--std-ddof", type=int, help="the episodes' std: 1 (unbiased, the "
                        f"default: {StatsOptions.std_ddof}) or 0")
    parser.add_argument("--average-ci", choices=AVERAGE_CIS, help="a domain average's CI: "
                        "pooled, sqrt(sum CI^2) / domains, or mean, the mean of the domains' CIs "
                        f"(default: {StatsOptions.average_ci})")
    parser.set_defaults(func=cmd_report)
