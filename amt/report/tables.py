"""The paper's tables from tidy results: specs are data, one builder renders them all.

Every table is written as CSV (numbers in %, columns ``<column>_mean``, ``<column>_ci``,
``<column>_n``), Markdown and LaTeX (booktabs; cells ``mean ± CI`` in %, best per column in
bold), one per (benchmark, backbone, setting) and, for the ``domains`` layout, per condition.
``tables.md`` indexes them with captions and lists every note: tables skipped because none of
their methods has results, methods absent from a table, cells without results.

Layouts:
- ``domains``: rows methods, columns the domains (in-domain first), then the in-domain and
  out-of-domain averages (mean of per-domain means, ± √(Σ ci²)/D or the mean CI, as the
  report's ``StatsOptions`` say) for a kind with 2+ domains.
- ``conditions``: rows methods, columns the conditions (clean, then each attack/norm/eps); a cell
  is the average over the out-of-domain targets (all domains when there is none).
- ``summary`` (the paper's adversarial and ablation tables): a column group per condition, each
  the in-domain domain (or average) and the out-of-domain average.
- ``corruptions``: a column group per corruption, its severities and their mean, then the mean
  over every corruption and severity (RobustBench's mean corruption accuracy); cells average the
  out-of-domain targets. A mean is taken per (seed, episode) first, over conditions every one of
  which the row has, so its interval is that of one paired quantity.

The paper's tables (``PAPER_TABLES``) group rows by a registry fact (``ROW_GROUPS``: test-time
fine-tuning, adversarial test-time fine-tuning) and show AMT's components as ✓/✗ columns
(``registry.components``). Their rows are the methods no ablation table (layout
``conditions``) lists, or an ablation table's own rows: a new method falls into place by its
registry entry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from amt.registry import COMPONENTS, METHODS, components, sweep_of
from amt.report.results import (
    METHOD_LABELS,
    condition_label,
    condition_slug,
    conditions,
    method_label,
    select_condition,
)
from amt.report.stats import DEFAULT, Estimate, mean_of_means, paired_difference, summarise
from amt.rows import GROUP, require_results
from amt.specs import StatsOptions

log = logging.getLogger(__name__)

MAIN_METHODS = ("pm", "pmf", "lora", "amt", "amt_ft")
ID_AVG, OOD_AVG = "in-domain avg", "out-of-domain avg"
Cells = dict[tuple[str, str], Estimate]
LAYOUTS = ("domains", "conditions", "summary", "corruptions")
# a registry fact that splits a paper table's rows: (the entry's fact, (label if not, if so))
ROW_GROUPS = {"ttf": ("finetune", ("without TTF", "with TTF")),
              "adv_ttf": ("ft_adversarial", ("without Adv. TTF", "with Adv. TTF"))}


@dataclass(frozen=True)
class TableSpec:
    """What a table shows; ``build_tables`` turns each spec into zero or more tables."""

    name: str
    title: str
    methods: tuple[str, ...] | None  # rows in order; None: every method but the reference
    kinds: tuple[str, ...]  # condition kinds covered: clean, adversarial
    layout: str = "domains"  # or "conditions"
    anchor: str | None = None  # a row shown for comparison; does not make a table on its own
    difference: bool = False  # cells are paired differences to the reference method
    labels: dict[str, str] = field(default_factory=dict)  # row labels overriding METHOD_LABELS
    family: str | None = None  # a sweep (registry.SWEEPS): its generated methods are rows too
    main: bool = False  # rows: every method no ablation table lists (methods left empty)
    row_groups: str | None = None  # a ROW_GROUPS key
    marks: bool = False  # ✓/✗ columns of AMT's components

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"table {self.name}: layout {self.layout!r}; expected one of "
                             f"{list(LAYOUTS)}")
        if self.main and self.methods != ():
            raise ValueError(f"table {self.name}: a main table's methods are found, not listed")
        if self.row_groups not in (None, *ROW_GROUPS):
            raise ValueError(f"table {self.name}: row groups {self.row_groups!r}; expected one "
                             f"of {list(ROW_GROUPS)}")
        if self.difference != (self.methods is None):
            raise ValueError(f"table {self.name}: methods must be None exactly when the table "
                             "shows differences (then every method is a row)")
        if self.difference and self.layout != "domains":
            raise ValueError(f"table {self.name}: differences need layout domains")


_BOTH = ("clean", "adversarial")
TABLES: tuple[TableSpec, ...] = (
    TableSpec("clean", "Clean accuracy", MAIN_METHODS, ("clean",)),
    TableSpec("adversarial", "Adversarial accuracy", MAIN_METHODS, ("adversarial",)),
    # one component off per row: APQ, APSV, RLP (one LoRA, no pool), TTM, STr
    TableSpec("ablation", "Ablation of AMT's components",
              ("amt_no_apq", "amt_no_apsv", "amt_single", "amt_no_ttm", "amt_no_str"), _BOTH,
              "conditions", anchor="amt"),
    TableSpec("merging", "Test-time merging strategies",
              ("amt_weight_avg", "amt_logit_avg", "amt_linear", "amt_single_best"), _BOTH,
              "conditions", anchor="amt", labels={"amt": "AMT (TTM)"}),
    TableSpec("lambda", "Sensitivity to λ_adv", (), _BOTH, "conditions", anchor="amt",
              labels={"amt": "AMT (train.amt.lambda_adv)"}, family="amt_lambda"),
    TableSpec("perturbation", "Perturbation space and LoRA initialisation",
              ("amt_weight_space", "amt_standard_init"), _BOTH, "conditions", anchor="amt",
              labels={"amt": "AMT (spectral APSV, SVD init)"}),
    TableSpec("pool", "LoRA pool strategies", ("amt_pool_uniform", "amt_pool_random"), _BOTH,
              "conditions", anchor="amt", labels={"amt": "separate pool (AMT)"}),
    TableSpec("release", "The authors' released AMT pool beside this pipeline's",
              ("amt_release",), _BOTH, "conditions", anchor="amt",
              labels={"amt": "AMT (this pipeline)"}),
    TableSpec("difference", "Paired difference to the reference method", None, _BOTH,
              difference=True),
)
# The ablation tables: their methods are not the main tables' rows
ABLATION_TABLES = tuple(s for s in TABLES if s.layout == "conditions")
# The paper's layouts: Table 1 (one per benchmark: Meta-Dataset, BSCD-FSL, fine-grained), the
# adversarial table, the corruptions, and every ablation table with its rows.
PAPER_TABLES: tuple[TableSpec, ...] = (
    TableSpec("table1", "Clean accuracy (the paper's Table 1)", (), ("clean",), main=True,
              row_groups="ttf"),
    TableSpec("paper_adversarial", "Clean and adversarial accuracy (the paper's layout)", (),
              _BOTH, "summary", main=True, row_groups="adv_ttf"),
    TableSpec("corruptions", "Accuracy under common corruptions", (), ("corruption",),
              "corruptions", main=True, row_groups="ttf"),
    *(replace(s, name=f"paper_{s.name}", title=f"{s.title} (the paper's layout)",
              layout="summary", marks=s.name == "ablation")
      for s in ABLATION_TABLES),
)


@dataclass
class Table:
    """A rendered-ready table: cells keyed by (row, column) id; a missing key is a missing cell."""

    stem: str
    caption: str
    rows: list[str]
    row_labels: list[str]
    columns: list[str]
    column_labels: list[str]
    cells: Cells
    signed: bool = False
    row_groups: list[str] | None = None  # a group label per row
    column_groups: list[str] | None = None  # a group label per column
    marks: dict[str, dict[str, bool]] = field(default_factory=dict)  # row -> COMPONENTS


# -- data selection -------------------------------------------------------------------------------
def ordered_methods(methods: set[str]) -> list[str]:
    """Known methods in the canonical order, then the others alphabetically."""
    known = [m for m in METHOD_LABELS if m in methods]
    return known + sorted(methods - set(known))


def ordered_domains(data: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(in-domain, out-of-domain) domains in order of appearance."""
    pairs = data[["domain", "in_domain"]].drop_duplicates("domain")
    return (pairs.domain[pairs.in_domain].tolist(), pairs.domain[~pairs.in_domain].tolist())


def _rows(spec: TableSpec, present: set[str], reference: str) -> list[str]:
    if spec.difference:
        return [m for m in ordered_methods(present) if m != reference] if reference in present \
            else []
    shown = [m for m in spec.methods if m in present] + _family_rows(spec, present)
    if not shown:
        return []
    rows = ([spec.anchor] if spec.anchor in present else []) + shown
    return sorted(rows, key=lambda m: _row_group(spec, m)) if spec.row_groups else rows


def _row_group(spec: TableSpec, method: str) -> bool:
    """The registry fact ``spec.row_groups`` names, of ``method`` (False if unregistered)."""
    fact = ROW_GROUPS[spec.row_groups][0]
    return method in METHODS and getattr(METHODS[method], fact)


def main_methods(results: pd.DataFrame) -> tuple[str, ...]:
    """The methods of ``results`` that no ablation table lists (by name, or as a member of the
    sweep family it shows: amt_lambda_3 belongs to the lambda table)."""
    listed = {m for s in ABLATION_TABLES for m in s.methods}
    families = {s.family for s in ABLATION_TABLES if s.family}

    def ablation(method: str) -> bool:
        found = sweep_of(method)
        return method in listed or (found is not None and found[0].family in families)

    return tuple(m for m in ordered_methods(set(results.method)) if not ablation(m))


def _family_rows(spec: TableSpec, present: set[str]) -> list[str]:
    """The present methods of the spec's sweep family, by value (amt_lambda_1, _3, _9)."""
    found = {m: sweep_of(m) for m in present}
    return sorted((m for m, f in found.items() if f and f[0].family == spec.family),
                  key=lambda m: found[m][1])


def _episodes(data: pd.DataFrame, method: str, domain: str) -> pd.Series:
    rows = data[(data.method == method) & (data.domain == domain)]
    return rows.set_index(["seed", "episode"])["accuracy"]


def domain_cells(data: pd.DataFrame, rows: Sequence[str], domains: Sequence[str],
                 reference: str | None = None, label: str = "",
                 stats: StatsOptions = DEFAULT) -> Cells:
    """Per (method, domain) estimate of one condition's rows; paired to ``reference`` if given."""
    if reference is None:
        summary = summarise(data[data.method.isin(rows)], ["method", "domain"], stats=stats)
        return {(r.method, r.domain): Estimate(r.mean, r.ci, int(r.n), int(r.seeds))
                for r in summary.itertuples(index=False)}
    cells: Cells = {}
    for method in rows:
        for domain in domains:
            a, b = _episodes(data, method, domain), _episodes(data, reference, domain)
            if len(a) and len(b):
                cells[method, domain] = paired_difference(
                    a, b, f"{method} vs {reference}, {label}, {domain}", stats)
    return cells


def average_cell(cells: Cells, row: str, domains: Sequence[str],
                 stats: StatsOptions = DEFAULT) -> Estimate | None:
    """Mean of the row's per-domain estimates; None unless every domain has one."""
    found = [cells.get((row, d)) for d in domains]
    return None if any(e is None for e in found) else mean_of_means(found, stats)


def target_domains(data: pd.DataFrame) -> tuple[list[str], str]:
    """The out-of-domain targets (all domains when there is none) and how to say so."""
    in_domain, out_domain = ordered_domains(data)
    if out_domain:
        return out_domain, f"averaged over {len(out_domain)} out-of-domain targets"
    return in_domain, f"averaged over {len(in_domain)} domains (none is out-of-domain)"


# -- building -------------------------------------------------------------------------------------
def _stem(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))


def _missing_note(table: Table) -> str | None:
    missing = {}
    for row in table.rows:
        gaps = [c for c in table.columns if (row, c) not in table.cells]
        if gaps:
            missing[row] = gaps
    if not missing:
        return None
    listed = "; ".join(f"{row}: {', '.join(gaps)}" for row, gaps in missing.items())
    return f"table {table.stem}: cells without results (shown as –): {listed}"


def _labels(spec: TableSpec, rows: list[str]) -> list[str]:
    return [spec.labels.get(m, method_label(m)) for m in rows]


def _caption(spec: TableSpec, group: tuple, reference: str, extra: str) -> str:
    unit = f"percentage points, minus {method_label(reference)}" if spec.difference else "%"
    return f"{spec.title} ({unit}); {', '.join(map(str, group))}; {extra}"


def _domains_table(spec: TableSpec, data: pd.DataFrame, group: tuple,
                   condition: tuple[str, str, float], rows: list[str],
                   reference: str, stats: StatsOptions) -> Table:
    in_domain, out_domain = ordered_domains(data[data.method.isin([*rows, reference])])
    domains = in_domain + out_domain
    label = condition_label(*condition)
    cells = domain_cells(data, rows, domains, reference if spec.difference else None,
                         f"{'/'.join(map(str, group))}, {label}", stats)
    columns, column_labels = list(domains), list(domains)
    for name, kind in ((ID_AVG, in_domain), (OOD_AVG, out_domain)):
        if len(kind) >= 2:
            columns.append(name)
            column_labels.append(name)
            for row in rows:
                estimate = average_cell(cells, row, kind, stats)
                if estimate is not None:
                    cells[row, name] = estimate
    where = f"; in-domain: {', '.join(in_domain)}" if in_domain else ""
    return Table(_stem(spec.name, *map(str, group), condition_slug(*condition)),
                 _caption(spec, group, reference, label + where), rows, _labels(spec, rows),
                 columns, column_labels, cells, signed=spec.difference)


def _conditions_table(spec: TableSpec, data: pd.DataFrame, group: tuple, rows: list[str],
                      reference: str, stats: StatsOptions) -> Table:
    shown = data[data.method.isin(rows)]
    targets, how = target_domains(shown)
    found = conditions(shown, spec.kinds)
    cells: Cells = {}
    for condition in found:
        per_domain = domain_cells(select_condition(shown, condition), rows, targets,
                                  stats=stats)
        slug = condition_slug(*condition)
        for row in rows:
            estimate = average_cell(per_domain, row, targets, stats)
            if estimate is not None:
                cells[row, slug] = estimate
    return Table(_stem(spec.name, *map(str, group)),
                 _caption(spec, group, reference, f"{how} ({', '.join(targets)})"), rows,
                 _labels(spec, rows), [condition_slug(*c) for c in found],
                 [condition_label(*c) for c in found], cells)


def _summary_columns(in_domain: list[str], out_domain: list[str]
                     ) -> list[tuple[str, list[str]]]:
    """(column, its domains): the in-domain domain (or their average if several), then the
    out-of-domain domain or average."""
    return [(kind[0] if len(kind) == 1 else name, kind)
            for name, kind in ((ID_AVG, in_domain), (OOD_AVG, out_domain)) if kind]


def _summary_table(spec: TableSpec, data: pd.DataFrame, group: tuple, rows: list[str],
                   reference: str, stats: StatsOptions) -> Table:
    shown = data[data.method.isin(rows)]
    in_domain, out_domain = ordered_domains(shown)
    columns, labels, groups, cells = [], [], [], {}
    for condition in conditions(shown, spec.kinds):
        per_domain = domain_cells(select_condition(shown, condition), rows,
                                  in_domain + out_domain, stats=stats)
        for name, domains in _summary_columns(in_domain, out_domain):
            column = f"{condition_slug(*condition)}:{name}"
            columns.append(column)
            labels.append(name)
            groups.append(condition_label(*condition))
            for row in rows:
                if (estimate := average_cell(per_domain, row, domains, stats)) is not None:
                    cells[row, column] = estimate
    where = f"in-domain: {', '.join(in_domain) or 'none'}; out-of-domain: " \
            f"{', '.join(out_domain) or 'none'}"
    return Table(_stem(spec.name, *map(str, group)), _caption(spec, group, reference, where),
                 rows, _labels(spec, rows), columns, labels, cells, column_groups=groups)


def _mean_over(frame: pd.DataFrame, found: list[tuple[str, str, float]]) -> pd.DataFrame:
    """Per (method, domain, seed, episode) the mean accuracy over the conditions ``found``,
    where every one of them has a row."""
    parts = pd.concat([select_condition(frame, c) for c in found])
    keys = ["method", "domain", "in_domain", "seed", "episode"]
    means = parts.groupby(keys, observed=True).accuracy.agg(["mean", "size"]).reset_index()
    return means[means["size"] == len(found)].rename(columns={"mean": "accuracy"})


def _corruption_table(spec: TableSpec, data: pd.DataFrame, group: tuple, rows: list[str],
                      reference: str, stats: StatsOptions) -> Table:
    shown = data[data.method.isin(rows)]
    targets, how = target_domains(shown)
    found = conditions(shown, ("corruption",))
    parts: list[tuple[str, str, str, pd.DataFrame]] = []  # column, label, group, its rows
    for name in dict.fromkeys(c[0] for c in found):
        theirs = [c for c in found if c[0] == name]
        label = name.replace("_", " ")
        parts += [(f"{name}:s{c[2]:g}", f"s{c[2]:g}", label, select_condition(shown, c))
                  for c in theirs]
        parts.append((f"{name}:mean", "mean", label, _mean_over(shown, theirs)))
    if found:
        parts.append(("mean", "mean", "all corruptions", _mean_over(shown, found)))
    cells: Cells = {}
    for column, _, _, part in parts:
        per_domain = domain_cells(part, rows, targets, stats=stats)
        for row in rows:
            if (estimate := average_cell(per_domain, row, targets, stats)) is not None:
                cells[row, column] = estimate
    return Table(_stem(spec.name, *map(str, group)),
                 _caption(spec, group, reference, f"{how} ({', '.join(targets)}); means "
                          "per episode over the severities, and over every corruption and "
                          "severity"),
                 rows, _labels(spec, rows), [p[0] for p in parts], [p[1] for p in parts],
                 cells, column_groups=[p[2] for p in parts])


_BUILDERS = {"conditions": _conditions_table, "summary": _summary_table,
             "corruptions": _corruption_table}


def _decorate(spec: TableSpec, table: Table) -> None:
    """The row groups and component marks the spec asks for, from the registry."""
    if spec.row_groups:
        labels = ROW_GROUPS[spec.row_groups][1]
        table.row_groups = [labels[_row_group(spec, row)] for row in table.rows]
    if spec.marks:
        table.marks = {row: components(row) for row in table.rows}


def spec_tables(spec: TableSpec, results: pd.DataFrame, notes: list[str],
                reference: str = "pm", stats: StatsOptions = DEFAULT) -> list[Table]:
    """Every table of ``spec`` the results support; notes what is skipped or missing."""
    tables = []
    for group, data in results.groupby(list(GROUP), sort=False):
        slices = ([(data, None)] if spec.layout != "domains" else
                  [(select_condition(data, c), c) for c in conditions(data, spec.kinds)])
        for part, condition in slices:
            present = set(part.method)
            rows = _rows(spec, present, reference)
            if not rows:
                continue
            table = (_BUILDERS[spec.layout](spec, part, group, rows, reference, stats)
                     if condition is None else
                     _domains_table(spec, part, group, condition, rows, reference, stats))
            if not table.columns:
                continue
            _decorate(spec, table)
            table.caption += _seeds_caption(table)
            wanted = (spec.anchor,) * bool(spec.anchor) + (spec.methods or ())
            absent = [m for m in wanted if m not in present]
            if absent:
                notes.append(f"table {table.stem}: methods without results: {', '.join(absent)}")
            if note := _missing_note(table):
                notes.append(note)
            tables.append(table)
    if not tables:
        notes.append(f"table {spec.name!r} skipped: {_skip_reason(spec, results, reference)}")
    return tables


def _skip_reason(spec: TableSpec, results: pd.DataFrame, reference: str) -> str:
    if spec.difference:
        return (f"needs the reference method {reference!r} and another method under the same "
                f"condition ({' or '.join(spec.kinds)}); methods present: "
                f"{ordered_methods(set(results.method))}")
    family = f" or {spec.family}_<value>" if spec.family else ""
    return (f"none of its methods {list(spec.methods)}{family} has {' or '.join(spec.kinds)} "
            "results "
            f"(methods present: {ordered_methods(set(results.method))})")


def _uncovered(results: pd.DataFrame, specs: Sequence[TableSpec],
               references: Sequence[str]) -> list[str]:
    """Say where results that no accuracy table shows end up."""
    named = {m for s in specs for m in (*(s.methods or ()), s.anchor) if m}
    named |= {m for s in specs for m in _family_rows(s, set(results.method))}
    notes = []
    if extra := set(results.method) - named - set(references):
        notes.append(f"methods in no accuracy table (see the difference tables): "
                     f"{', '.join(ordered_methods(extra))}")
    if (results.norm == "corruption").any() and \
            not any(s.layout == "corruptions" for s in specs):
        notes.append("corruption rows are shown in the corruption figures, not in tables")
    return notes


# -- rendering ------------------------------------------------------------------------------------
def _number(value: float, signed: bool) -> str:
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def best_cells(table: Table) -> set[tuple[str, str]]:
    """Per column, the cells whose displayed mean is the highest (ties all bold)."""
    best = set()
    for column in table.columns:
        shown = {row: round(100 * table.cells[row, column].mean, 2) for row in table.rows
                 if (row, column) in table.cells}
        if shown:
            top = max(shown.values())
            best |= {(row, column) for row, value in shown.items() if value == top}
    return best


def _cell_text(table: Table, row: str, column: str) -> tuple[str, str] | None:
    estimate = table.cells.get((row, column))
    if estimate is None:
        return None
    return _number(estimate.mean, table.signed), f"{100 * estimate.ci:.2f}"


MARK = {True: "✓", False: "✗"}


def _group_starts(table: Table) -> dict[int, str]:
    """Row index -> the row group's label, where a group starts."""
    if table.row_groups is None:
        return {}
    return {i: g for i, g in enumerate(table.row_groups)
            if i == 0 or table.row_groups[i - 1] != g}


def _column_spans(table: Table) -> list[tuple[str, int]]:
    """Consecutive columns of one group: (its label, how many)."""
    spans: list[tuple[str, int]] = []
    for label in table.column_groups or ():
        if spans and spans[-1][0] == label:
            spans[-1] = (label, spans[-1][1] + 1)
        else:
            spans.append((label, 1))
    return spans


def _header_labels(table: Table) -> list[str]:
    """Column labels, prefixed by their group's where columns are grouped (Markdown, CSV)."""
    if table.column_groups is None:
        return list(table.column_labels)
    return [f"{g}: {label}" for g, label in zip(table.column_groups, table.column_labels,
                                                strict=True)]


def to_markdown(table: Table) -> str:
    best = best_cells(table)
    marks = list(COMPONENTS) if table.marks else []
    lines = [f"**{table.caption}**", "",
             "| Method | " + " | ".join(marks + _header_labels(table)) + " |",
             "|---|" + ":---:|" * len(marks) + "---:|" * len(table.columns)]
    starts = _group_starts(table)
    for i, (row, label) in enumerate(zip(table.rows, table.row_labels, strict=True)):
        if i in starts:
            lines.append(f"| *{starts[i]}* |" + " |" * (len(marks) + len(table.columns)))
        cells = [MARK[table.marks[row][m]] for m in marks]
        for column in table.columns:
            text = _cell_text(table, row, column)
            cell = "–" if text is None else f"{text[0]} ± {text[1]}"
            cells.append(f"**{cell}**" if (row, column) in best else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                  "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "ℓ": r"$\ell$", "∞": r"$\infty$",
                  "ε": r"$\varepsilon$", "–": "--", "·": r"$\cdot$", "±": r"$\pm$",
                  "λ": r"$\lambda$", "✓": r"\checkmark", "✗": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex_column_groups(table: Table, first: int) -> list[str]:
    """The header row of the column groups (spanning their columns) and its rules; ``first``:
    the number of columns before them."""
    cells, rules, at = [""] * first, [], first + 1
    for label, width in _column_spans(table):
        cells.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(label)}}}")
        rules.append(rf"\cmidrule(lr){{{at}-{at + width - 1}}}")
        at += width
    return [" & ".join(cells) + r" \\", " ".join(rules)]


def to_latex(table: Table) -> str:
    best = best_cells(table)
    marks = list(COMPONENTS) if table.marks else []
    width = 1 + len(marks) + len(table.columns)
    lines = ["% needs \\usepackage{booktabs, amssymb}", r"\begin{table}[t]", r"\centering",
             rf"\caption{{{latex_escape(table.caption)}}}",
             rf"\label{{tab:{table.stem}}}",
             rf"\begin{{tabular}}{{l{'c' * (width - 1)}}}", r"\toprule"]
    if table.column_groups is not None:
        lines += _latex_column_groups(table, 1 + len(marks))
    lines += [" & ".join(["Method", *marks, *map(latex_escape, table.column_labels)]) + r" \\",
              r"\midrule"]
    starts = _group_starts(table)
    for i, (row, label) in enumerate(zip(table.rows, table.row_labels, strict=True)):
        if i in starts:
            lines += [r"\midrule"] * (i > 0)
            lines.append(rf"\multicolumn{{{width}}}{{l}}{{\textit{{{latex_escape(starts[i])}}}}} "
                         r"\\")
        cells = [latex_escape(label)] + [latex_escape(MARK[table.marks[row][m]]) for m in marks]
        for column in table.columns:
            text = _cell_text(table, row, column)
            if text is None:
                cells.append("--")
            elif (row, column) in best:
                cells.append(rf"$\mathbf{{{text[0]} \pm {text[1]}}}$")
            else:
                cells.append(rf"${text[0]} \pm {text[1]}$")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_frame(table: Table) -> pd.DataFrame:
    """Numbers in % (points for differences); empty where a cell has no results; the row group
    and the component marks (true/false) where the table has them."""
    records = []
    for i, row in enumerate(table.rows):
        record: dict[str, object] = {"method": row}
        if table.row_groups is not None:
            record["group"] = table.row_groups[i]
        record.update(table.marks.get(row, {}))
        for column in table.columns:
            estimate = table.cells.get((row, column))
            record[f"{column}_mean"] = np.nan if estimate is None else 100 * estimate.mean
            record[f"{column}_ci"] = np.nan if estimate is None else 100 * estimate.ci
            record[f"{column}_n"] = pd.NA if estimate is None else estimate.n
        records.append(record)
    return pd.DataFrame.from_records(records)


def write_table(table: Table, out_dir: Path) -> list[Path]:
    paths = [out_dir / f"{table.stem}.{suffix}" for suffix in ("csv", "md", "tex")]
    to_frame(table).to_csv(paths[0], index=False, float_format="%.4f")
    paths[1].write_text(to_markdown(table), encoding="utf-8")
    paths[2].write_text(to_latex(table), encoding="utf-8")
    return paths


AVERAGE_CI_TEXT = {"pooled": "± √(Σ CI²) / domains (independent domains)",
                   "mean": "± the mean of the per-domain CIs (the AMT release's)"}


def _index(tables: list[Table], notes: list[str], references: Sequence[str],
           stats: StatsOptions) -> str:
    minus = " or ".join(method_label(r) for r in references)
    lines = ["# Tables", "",
             f"Cells: mean ± 95% CI in %, {_seeds_text(tables)}, with the std of ddof="
             f"{stats.std_ddof}. Averages: mean of per-domain means, "
             f"{AVERAGE_CI_TEXT[stats.average_ci]}. "
             f"Differences (difference_vs_<method>): paired on shared episodes, minus {minus}. "
             "Bold: best per column.", ""]
    lines += [f"- [{t.stem}]({t.stem}.md) ([csv]({t.stem}.csv), [tex]({t.stem}.tex)): "
              f"{t.caption}" for t in tables]
    lines += ["", "## Notes", ""] + ([f"- {n}" for n in notes] or ["- none"])
    return "\n".join(lines) + "\n"


def _seeds_caption(table: Table) -> str:
    """'; 3 seeds' (or '; 2-3 seeds') when the cells average several training seeds."""
    seeds = sorted({e.seeds for e in table.cells.values()})
    if seeds in ([], [1]):
        return "; 1 seed"
    return f"; {seeds[0]}-{seeds[-1]} seeds" if len(seeds) > 1 else f"; {seeds[0]} seeds"


def _seeds_text(tables: list[Table]) -> str:
    """How many training seeds the cells average, and what the interval covers."""
    seeds = sorted({e.seeds for t in tables for e in t.cells.values()})
    if seeds in ([], [1]):
        return ("one training seed: the interval covers the test episodes only, 1.96 · std / "
                "√n, not the spread between training runs")
    counts = " to ".join(map(str, (seeds[0], seeds[-1]))) if len(seeds) > 1 else str(seeds[0])
    return (f"averaged over {counts} training seeds and the test episodes: the episode "
            "interval and the between-seed interval (Student's t) in quadrature "
            "(docs/method.md, Statistics)")


REFERENCES = ("pm", "lora")  # the baselines AMT's paired differences are taken against


def _per_reference(specs: Sequence[TableSpec], references: Sequence[str]
                   ) -> Iterator[tuple[TableSpec, str]]:
    """Every difference spec once per reference (named ``<name>_vs_<reference>``), every other
    spec once."""
    for spec in specs:
        if spec.difference:
            yield from ((replace(spec, name=f"{spec.name}_vs_{r}"), r) for r in references)
        else:
            yield spec, references[0]


def build_tables(results: pd.DataFrame, out_dir: Path, references: Sequence[str] = REFERENCES,
                 specs: Sequence[TableSpec] = TABLES + PAPER_TABLES,
                 stats: StatsOptions = DEFAULT) -> list[Path]:
    """Write every table the results support and ``tables.md``; return the paths written.
    Paired-difference tables are written once per method in ``references``; ``stats`` says
    how episodes and domains are summarised."""
    if not references or len(set(references)) != len(references):
        raise ValueError(f"reference methods {list(references)}: expected one or more, "
                         "each once")
    require_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    main = main_methods(results)
    specs = [replace(s, methods=main, main=False) if s.main else s for s in specs]
    tables = [t for spec, reference in _per_reference(specs, references)
              for t in spec_tables(spec, results, notes, reference, stats)]
    notes += _uncovered(results, specs, references)
    for note in notes:
        log.warning("%s", note)
    paths = [p for table in tables for p in write_table(table, out_dir)]
    index = out_dir / "tables.md"
    index.write_text(_index(tables, notes, references, stats), encoding="utf-8")
    log.info("wrote %d tables to %s", len(tables), out_dir)
    return [*paths, index]
