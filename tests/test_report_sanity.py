"""The sanity table: every evaluation job's checks, counted by family, failures listed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from amt.conditions import Condition
from amt.report import register
from amt.report.sanity import KINDS, load_sanity, to_markdown
from amt.rows import ResultsError
from amt.sanity import sanity_checks
from amt.specs import AttackSpec, SanitySpec


def _checks(pgd_accuracy: float) -> list[dict]:
    """The real checks of a one-episode job whose PGD at 0.01 leaves ``pgd_accuracy`` and the
    worst case over PGD and APGD-CE at that budget half a point less."""
    rows = [("none", "none", 0.0, 0.9), ("pgd", "linf", 0.01, pgd_accuracy),
            ("pgd", "linf", 0.02, 0.2), ("apgd_ce", "linf", 0.01, pgd_accuracy - 0.005),
            ("noise", "linf", 0.01, 0.9), ("noise", "linf", 0.02, 0.9)]
    frame = pd.DataFrame([{"episode": 0, "attack": a, "norm": n, "eps": e, "accuracy": acc}
                          for a, n, e, acc in rows])
    spec = AttackSpec("pgd", "linf", (0.01, 0.02), steps=3)
    conditions = [Condition("pgd", "linf", 0.01, spec), Condition("pgd", "linf", 0.02, spec),
                  Condition("apgd_ce", "linf", 0.01, AttackSpec("apgd_ce", "linf", (0.01,)))]
    extras = [{"kind": "steps", "key": conditions[0].key, "episode": 0, "accuracy": 0.3},
              {"kind": "large_eps", "eps": 0.25, "episode": 0, "accuracy": 0.0},
              {"kind": "worst", "norm": "linf", "eps": 0.01, "episode": 0,
               "attacks": ["pgd", "apgd_ce"], "accuracy": pgd_accuracy - 0.005}]
    return sanity_checks(frame, extras, conditions, SanitySpec(large_eps=0.25))


def _write(folder: Path, method: str, checks: list[dict]) -> Path:
    path = folder / "dino" / "5w1s" / "mnist" / f"{method}.sanity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setting": "5w1s", "domain": "mnist",
                                "method": method, "all_ok": all(c["ok"] for c in checks),
                                "checks": checks}))
    return path


def test_every_check_family_is_named_and_failures_are_listed(tmp_path):
    good, bad = _checks(0.5), _checks(0.1)  # 0.1: the 2k-step run (0.3) beats k steps
    assert all(c["ok"] for c in good) and not all(c["ok"] for c in bad)
    frame = load_sanity([_write(tmp_path, "pm", good), _write(tmp_path, "amt", bad)])
    assert len(frame) == len(good) + len(bad)
    assert set(frame.check.map(lambda c: next(k for p, k in KINDS.items() if p in c))) == \
        set(KINDS.values())  # every real check text falls in a family
    text = to_markdown(frame)
    assert "1 of 2 jobs pass every check" in text
    assert "| 2k PGD steps never more accurate than k | 1 | 1 |" in text
    failed = [c["check"] for c in bad if not c["ok"]]
    assert [line for line in text.splitlines() if line.startswith("- ")] == \
        [f"- amt: {c}" for c in failed]  # the job: its file under the files' common folder
    assert "| pm | pgd linf eps 0.01 | 50.00 | worst case over pgd+apgd_ce | 49.50 | 0.50 | " \
           "yes |" in text
    assert "| the headline attack within 1 point of the strongest | 2 | 0 |" in text


def test_a_file_without_the_job_keys_is_refused_by_name(tmp_path):
    path = tmp_path / "old.sanity.json"
    path.write_text(json.dumps({"method": "pm", "checks": []}))
    with pytest.raises(ResultsError, match=r"old.sanity.json.*\['setting', 'domain'\]"):
        load_sanity([path])


def test_report_command_writes_the_sanity_table(tmp_path, report_inputs):
    jobs, _ = report_inputs
    parser = argparse.ArgumentParser(prog="amt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["report", "--results", *map(str, jobs), "--sanity",
         str(_write(tmp_path, "amt", _checks(0.5))), "--tables-dir", str(tmp_path / "tables"),
         "--figures-dir", str(tmp_path / "figures")])
    assert args.func(args) == 0
    table = pd.read_csv(tmp_path / "tables" / "sanity.csv")
    assert table.ok.all() and set(table.job) == {"amt"} and set(table.method) == {"amt"}
    assert "No check failed." in (tmp_path / "tables" / "sanity.md").read_text()
