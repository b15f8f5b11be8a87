"""The evaluation jobs' sanity checks gathered into one table (``sanity.csv`` / ``sanity.md``).

Each evaluation job writes ``<rows>.sanity.json`` (``amt.evaluate``): accuracy non-increasing
in eps, more PGD steps never helping the model, uniform noise hurting far less than the
attack, near-zero accuracy at a large budget, the headline attack within a point of the
strongest. A failed check only warns in the job's log; this table puts every job's checks where
a reader of the tables sees them, and the headline attack's accuracy beside the strongest's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from amt.rows import ResultsError

JOB_KEYS = ("setting", "domain", "method")
# the headline check's numbers (empty for the other checks)
NUMBERS = ("headline", "accuracy", "strongest", "strongest_accuracy")
SUFFIX = ".sanity.json"


def load_sanity(paths: Iterable[Path | str]) -> pd.DataFrame:
    """One row per (job, check): the job (its file, relative to the folder all the files share,
    without the suffix: ``small_vit/5w1s/mnist/amt``), its keys, the check and whether it
    passed."""
    paths = [Path(p) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path()
    records = []
    for path in paths:
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path}: not JSON ({error})") from error
        missing = [k for k in (*JOB_KEYS, "checks") if k not in job]
        if missing:
            raise ResultsError(f"{path}: a sanity file without {missing}; expected the JSON "
                               "an evaluation job writes")
        name = str(path.relative_to(root)).removesuffix(SUFFIX)
        for check in job["checks"]:
            if not {"check", "ok"} <= check.keys():
                raise ResultsError(f"{path}: a check without 'check' and 'ok': {check}")
            records.append({"job": name, **{k: job[k] for k in JOB_KEYS},
                            "check": check["check"], "ok": bool(check["ok"]),
                            **{k: check.get(k) for k in NUMBERS}})
    return pd.DataFrame.from_records(records, columns=["job", *JOB_KEYS, "check", "ok",
                                                       *NUMBERS])


KINDS = {  # a phrase of the check's text -> the check's family, whatever attack and budget
    "non-increasing in eps": "accuracy non-increasing in eps",
    "uniform noise": "uniform noise hurts far less than the attack",
    " steps ": "2k PGD steps never more accurate than k",
    "reaches ~0": "a large eps leaves ~0% accuracy",
    "headline ": "the headline attack within 1 point of the strongest",
}


def _kind(check: str) -> str:
    return next((kind for phrase, kind in KINDS.items() if phrase in check), check)


def to_markdown(frame: pd.DataFrame) -> str:
    jobs = frame.groupby("job").ok.all()
    lines = ["**Sanity checks of the evaluation jobs**", "",
             f"{int(jobs.sum())} of {len(jobs)} jobs pass every check "
             f"({int(frame.ok.sum())} of {len(frame)} checks).", "",
             "| check | passed | failed |", "|---|---:|---:|"]
    by_kind = frame.assign(kind=frame.check.map(_kind)).groupby("kind").ok
    for kind, ok in by_kind:
        lines.append(f"| {kind} | {int(ok.sum())} | {int((~ok).sum())} |")
    failed = frame[~frame.ok]
    lines += ["", "Failed:" if len(failed) else "No check failed."]
    lines += [f"- {r.job}: {r.check}" for r in failed.itertuples()]
    return "\n".join(lines + _headline_lines(frame)) + "\n"


def _headline_lines(frame: pd.DataFrame) -> list[str]:
    """Each job's headline attack beside the worst case over every attack at its budget."""
    rows = frame[frame.check.map(_kind) == KINDS["headline "]]
    if rows.empty:
        return ["", "No job runs a second attack at its headline budget: the headline attack "
                "is not compared with a stronger one."]
    lines = ["", "**The headline attack against the strongest on the same episodes** "
             "(accuracy in %; gap: headline minus strongest, at most 1 point)", "",
             "| job | headline | accuracy | strongest | accuracy | gap | ok |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in rows.itertuples():
        gap = 100 * (r.accuracy - r.strongest_accuracy)
        lines.append(f"| {r.job} | {r.headline} | {100 * r.accuracy:.2f} | {r.strongest} | "
                     f"{100 * r.strongest_accuracy:.2f} | {gap:.2f} | "
                     f"{'yes' if r.ok else 'no'} |")
    return lines


def write_sanity_table(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sanity.csv", out_dir / "sanity.md"]
    frame.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(frame), encoding="utf-8")
    return paths
