"""Compare two result folders of the same configuration: where and by how much do they differ?

    python bench/compare_results.py RESULTS_A RESULTS_B [--json]

Used to measure how far the default's numbers move between CPUs (native instruction sets
against capped ones) and to check that a change meant to keep the numbers keeps them:
- trained weights: the largest absolute difference of any tensor in each model.pt / pool.pt;
- tidy result rows: how many accuracies differ, and the largest difference (points);
- tables: the largest difference of any mean in results/tables/*.csv (points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint, keyed by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list | tuple) else ())
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


def weight_differences(a: Path, b: Path) -> dict[str, float]:
    out = {}
    for path in sorted(a.glob("**/*.pt")):
        if path.name not in ("model.pt", "pool.pt"):
            continue
        other = b / path.relative_to(a)
        ta = _tensors(torch.load(path, map_location="cpu", weights_only=True))
        tb = _tensors(torch.load(other, map_location="cpu", weights_only=True))
        out[str(path.relative_to(a))] = max(
            (float((ta[k].double() - tb[k].double()).abs().max()) for k in ta
             if ta[k].is_floating_point() and ta[k].numel()), default=0.0)
    return out


def row_differences(a: Path, b: Path) -> dict[str, float]:
    keys = ["backbone", "setting", "domain", "method", "episode", "attack", "norm", "eps"]
    frames = []
    for root in (a, b):
        rows = pd.concat(pd.read_csv(p) for p in sorted(root.glob("eval/**/*.csv"))
                         if not p.name.endswith(".spectra.csv"))
        frames.append(rows.set_index(keys)["accuracy"])
    joined = pd.concat(frames, axis=1, keys=["a", "b"], join="outer")
    delta = (joined["a"] - joined["b"]).abs() * 100
    return {"rows": len(joined), "rows_differing": int((delta > 0).sum()),
            "unpaired_rows": int(joined.isna().any(axis=1).sum()),
            "max_points": float(delta.max())}


def table_differences(a: Path, b: Path) -> dict[str, float]:
    worst, compared = 0.0, 0
    for path in sorted((a / "tables").glob("*.csv")):
        if path.name.startswith("sanity"):
            continue
        ta, tb = pd.read_csv(path), pd.read_csv(b / "tables" / path.name)
        numeric = [c for c in ta.columns if pd.api.types.is_float_dtype(ta[c])]
        if numeric:
            worst = max(worst, float((ta[numeric] - tb[numeric]).abs().max().max()))
            compared += 1
    return {"tables": compared, "max_points": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"weights_max_abs": weight_differences(args.a, args.b),
              "rows": row_differences(args.a, args.b),
              "tables": table_differences(args.a, args.b)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| trained file | largest weight difference |\n|---|---:|")
    for name, value in report["weights_max_abs"].items():
        print(f"| {name} | {value:.3g} |")
    rows, tables = report["rows"], report["tables"]
    print(f"\nresult rows: {rows['rows_differing']} of {rows['rows']} differ "
          f"(largest {rows['max_points']:.2f} points; {rows['unpaired_rows']} unpaired)")
    print(f"tables: {tables['tables']} compared, largest difference {tables['max_points']:.2f}"
          " points")


if __name__ == "__main__":
    main()
