"""The paper's figures from tidy results (seaborn, PNG and PDF, no pyplot state).

Every figure is one per (benchmark, backbone, setting) unless said otherwise:
- ``clean_vs_adv_*``: accuracy per domain and method, one panel per condition (clean first).
- ``eps_curve_*`` per (attack, norm): accuracy vs ε, a line per method (clean as ε = 0) with its
  95% CI band, one panel per domain.
- ``ablation_*``, ``merging_*``, ``pool_*``: the bars of the matching ``conditions`` table.
- ``corruptions_*``: accuracy per corruption (each episode averaged over severities) per method,
  one panel per domain, clean bars first for reference.
- ``spectra_<domain>``: singular values of merged weights per layer, a line per method.
Bars and bands show mean ± 1.96 · std / √n over episodes (the report's ``StatsOptions``), the
numbers of the tables.

Seaborn 0.13.2 mis-orders ``hue_order`` for pandas 3's string columns (seaborn#3893), so every
categorical column is handed to seaborn as object dtype (``_plain``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from amt.report.results import condition_label, conditions, method_label, select_condition
from amt.report.stats import DEFAULT, mean_ci, summarise
from amt.report.tables import (
    MAIN_METHODS,
    TABLES,
    Table,
    ordered_domains,
    ordered_methods,
    spec_tables,
)
from amt.report.training import training_figures
from amt.rows import GROUP, require_results
from amt.specs import StatsOptions

log = logging.getLogger(__name__)

ACCURACY = "Accuracy (%)"
Palette = dict[str, tuple[float, float, float]]
Figures = Iterator[tuple[str, Figure]]  # (file stem, figure), drawn one at a time


# -- plumbing -------------------------------------------------------------------------------------
def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Object dtype for string columns: seaborn 0.13.2 + pandas 3 (seaborn#3893)."""
    text = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c])]
    return frame.astype({c: object for c in text})


def method_palette(methods: set[str]) -> Palette:
    """One colour per method, the same in every figure of a run."""
    ordered = ordered_methods(methods)
    return dict(zip(ordered, sns.color_palette("colorblind", len(ordered)), strict=True))


def _panels(count: int, ncols: int, width: float, height: float,
            share: bool = False) -> tuple[Figure, list[Axes]]:
    """A grid of ``count`` panels of width x height inches; constrained layout keeps the
    suptitle and labels apart."""
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    figure = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, sharex=share, sharey=share)
    axes = axes.ravel().tolist()
    for spare in axes[count:]:
        spare.set_visible(False)
    return figure, axes[:count]


def _legend(figure: Figure, methods: Sequence[str], palette: Palette,
            labels: Sequence[str] | None = None, lines: bool = False) -> None:
    """One legend for all panels, outside on the right; patches for bars, lines for curves."""
    labels = labels or [method_label(m) for m in methods]
    handles = [Line2D([], [], color=palette[m], marker="o", label=label) if lines
               else Patch(color=palette[m], label=label)
               for m, label in zip(methods, labels, strict=True)]
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                  title="Method")


def save_figure(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    """PNG (150 dpi) and PDF, cropped to what is drawn (the legend sits outside the axes)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
    paths = [out_dir / f"{stem}.{suffix}" for suffix in ("png", "pdf")]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _group_title(group: tuple) -> str:
    return " · ".join(map(str, group))


def _bars(ax: Axes, summary: pd.DataFrame, x: str, order: Sequence[str],
          methods: Sequence[str], palette: Palette,
          ticks: Sequence[str] | None = None) -> None:
    """Grouped bars of precomputed means (%) with their CI whiskers; x categories (shown as
    ``ticks``, default their names), hue methods."""
    data = _plain(summary.assign(value=100 * summary["mean"], half=100 * summary["ci"]))
    sns.barplot(data, x=x, y="value", hue="method", order=list(order), hue_order=list(methods),
                palette=palette, saturation=1, errorbar=None, legend=False, ax=ax)
    half = {(k, m): h for k, m, h in zip(data[x], data["method"], data["half"], strict=True)}
    # Seaborn makes one container per hue level (in hue_order) with one bar per category
    # present; a bar's centre rounds to its category's position.
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]  # before errorbar adds more
    for container, method in zip(bars, methods, strict=True):
        for bar in container:
            centre = bar.get_x() + bar.get_width() / 2
            ax.errorbar(centre, bar.get_height(), yerr=half[order[round(centre)], method],
                        color="black", linewidth=0.8, capsize=2)
    ax.set_xlabel("")
    ax.set_ylabel(ACCURACY)
    ax.set_ylim(0, 100)
    ax.set_xticks(range(len(order)), ticks or order)
    if len(order) > 4:
        for label in ax.get_xticklabels():
            label.set(rotation=30, horizontalalignment="right", rotation_mode="anchor")


def _domain_ticks(in_domain: list[str], out_domain: list[str]) -> list[str]:
    return [f"{d}\n(in-domain)" for d in in_domain] + out_domain


# -- figures --------------------------------------------------------------------------------------
def clean_vs_adversarial(results: pd.DataFrame, palette: Palette,
                         stats: StatsOptions = DEFAULT) -> Figures:
    """Per domain and method, one panel per condition: clean, then each adversarial one."""
    for group, data in results.groupby(list(GROUP), sort=False):
        data = data[data.method.isin(MAIN_METHODS)]
        found = conditions(data, ("clean", "adversarial"))
        if len(found) < 2 or found[0][1] != "none":
            continue
        methods = [m for m in MAIN_METHODS if m in set(data.method)]
        in_domain, out_domain = ordered_domains(data)
        domains = in_domain + out_domain
        figure, axes = _panels(len(found), 1, max(6.0, 0.22 * len(domains) * len(methods) + 2),
                               2.8)
        for ax, condition in zip(axes, found, strict=True):
            summary = summarise(select_condition(data, condition), ["domain", "method"],
                                stats=stats)
            _bars(ax, summary, "domain", domains, methods, palette,
                  _domain_ticks(in_domain, out_domain))
            ax.set_title(condition_label(*condition))
        _legend(figure, methods, palette)
        figure.suptitle(f"Clean vs adversarial accuracy — {_group_title(group)}")
        yield "clean_vs_adv_" + "_".join(map(str, group)), figure


def _ci_band(stats: StatsOptions) -> Callable[[pd.Series], tuple[float, float]]:
    def band(values: pd.Series) -> tuple[float, float]:
        estimate = mean_ci(values.to_numpy(), stats)
        return estimate.mean - estimate.ci, estimate.mean + estimate.ci
    return band


def _eps_axis(norm: str, eps: pd.Series) -> tuple[pd.Series, str]:
    if norm == "linf":
        return eps * 255, "ε (×1/255, ℓ∞)"
    return eps, f"ε ({'ℓ2' if norm == 'l2' else norm})"


def eps_curves(results: pd.DataFrame, palette: Palette, stats: StatsOptions = DEFAULT
               ) -> Figures:
    """Accuracy vs ε per (attack, norm), clean at ε = 0; a panel per domain."""
    for group, data in results.groupby(list(GROUP), sort=False):
        data = data[data.method.isin(MAIN_METHODS)]
        clean = data[data.norm == "none"]
        attacked = data[data.norm.isin(("linf", "l2"))]
        for (attack, norm), rows in attacked.groupby(["attack", "norm"], sort=True):
            stem = f"eps_curve_{'_'.join(map(str, group))}_{attack}_{norm}"
            yield stem, _eps_figure(pd.concat([clean, rows]), group, attack, norm, palette,
                                    stats)


def _eps_figure(data: pd.DataFrame, group: tuple, attack: str, norm: str,
                palette: Palette, stats: StatsOptions) -> Figure:
    methods = [m for m in MAIN_METHODS if m in set(data.method)]
    in_domain, out_domain = ordered_domains(data)
    x, xlabel = _eps_axis(norm, data["eps"])
    data = _plain(data.assign(x=x, value=100 * data["accuracy"]))
    figure, axes = _panels(len(in_domain + out_domain), 4, 3.4, 2.8)
    for ax, domain in zip(axes, in_domain + out_domain, strict=True):
        sns.lineplot(data[data.domain == domain], x="x", y="value", hue="method",
                     hue_order=methods, palette=palette, errorbar=_ci_band(stats), marker="o",
                     legend=False, ax=ax)
        ax.set_title(f"{domain} (in-domain)" if domain in in_domain else domain)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ACCURACY)
        ax.set_ylim(0, 100)
    _legend(figure, methods, palette, lines=True)
    threat = condition_label(attack, norm, 1).split(" ε=")[0]
    figure.suptitle(f"Accuracy vs ε, {threat} — {_group_title(group)}")
    return figure


def table_bars(results: pd.DataFrame, palette: Palette, stats: StatsOptions = DEFAULT
               ) -> Figures:
    """Bars of every ``conditions`` table (ablation, merging, pool): the same numbers."""
    for spec in TABLES:
        if spec.layout == "conditions":
            for table in spec_tables(spec, results, [], stats=stats):
                yield table.stem, _table_figure(table, palette)


def _table_figure(table: Table, palette: Palette) -> Figure:
    records = [(label, row, cell.mean, cell.ci)
               for column, label in zip(table.columns, table.column_labels, strict=True)
               for row in table.rows if (cell := table.cells.get((row, column)))]
    summary = pd.DataFrame(records, columns=["condition", "method", "mean", "ci"])
    width = max(5.0, 0.25 * len(table.columns) * len(table.rows) + 2)
    figure, (ax,) = _panels(1, 1, width, 3.2)
    _bars(ax, summary, "condition", table.column_labels, table.rows, palette)
    _legend(figure, table.rows, palette, table.row_labels)
    title, _, detail = table.caption.partition("; ")
    figure.suptitle(f"{title}\n{detail}")
    return figure


def corruption_bars(results: pd.DataFrame, palette: Palette, notes: list[str],
                    stats: StatsOptions = DEFAULT) -> Figures:
    """Accuracy per corruption (severities averaged per episode) and method; a panel per domain."""
    for group, data in results.groupby(list(GROUP), sort=False):
        data = data[data.method.isin(MAIN_METHODS)]
        corrupted = data[data.norm == "corruption"]
        if corrupted.empty:
            continue
        _note_severities(corrupted, group, notes)
        per_episode = (corrupted.groupby(["domain", "method", "attack", "seed", "episode"],
                                         sort=False)["accuracy"].mean().reset_index())
        clean = data.loc[data.norm == "none",
                         ["domain", "method", "seed", "episode", "accuracy"]]
        per_episode = pd.concat([clean.assign(attack="clean"), per_episode])
        yield ("corruptions_" + "_".join(map(str, group)),
               _corruption_figure(per_episode, data, group, palette, stats))


def _note_severities(corrupted: pd.DataFrame, group: tuple, notes: list[str]) -> None:
    """Severity averages compare only if every method saw the same severities."""
    seen = corrupted.groupby(["domain", "attack", "method"])["eps"].agg(frozenset)
    for (domain, attack), per_method in seen.groupby(level=[0, 1]):
        if per_method.nunique() > 1:
            notes.append(f"corruptions {_group_title(group)}: {domain}/{attack} severities differ "
                         f"by method {dict(per_method.droplevel([0, 1]).map(sorted))}")


def _corruption_figure(per_episode: pd.DataFrame, data: pd.DataFrame, group: tuple,
                       palette: Palette, stats: StatsOptions) -> Figure:
    methods = [m for m in MAIN_METHODS if m in set(per_episode.method)]
    names = ["clean"] * bool((per_episode.attack == "clean").any()) + sorted(
        set(per_episode.attack) - {"clean"})
    in_domain, out_domain = ordered_domains(data[data.norm == "corruption"])
    width = max(5.0, 0.2 * len(names) * len(methods) + 1.5)
    figure, axes = _panels(len(in_domain + out_domain), 2, width, 3.0)
    for ax, domain in zip(axes, in_domain + out_domain, strict=True):
        rows = per_episode[per_episode.domain == domain]
        shown = [n for n in names if n in set(rows.attack)]
        _bars(ax, summarise(rows, ["attack", "method"], stats=stats), "attack", shown, methods,
              palette,
              [n.replace("_", " ") for n in shown])
        ax.set_title(f"{domain} (in-domain)" if domain in in_domain else domain)
    _legend(figure, methods, palette)
    figure.suptitle("Accuracy under common corruptions (mean over severities) — "
                    f"{_group_title(group)}")
    return figure


def _natural(text: str) -> list:
    """'blocks.2.mlp' before 'blocks.10.mlp'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def spectra_figures(spectra: pd.DataFrame, palette: Palette) -> Figures:
    """Singular values by index per layer (a panel each), a line per method; one per domain."""
    for domain, data in spectra.groupby("domain", sort=False):
        layers = sorted(set(data.layer), key=_natural)
        methods = ordered_methods(set(data.method))
        data = _plain(data)
        logscale = bool((data.singular_value > 0).all())  # zeros vanish on a log axis
        figure, axes = _panels(len(layers), 6, 2.4, 1.9, share=True)
        for ax, layer in zip(axes, layers, strict=True):
            rows = data[data.layer == layer]
            sns.lineplot(rows, x="index", y="singular_value", hue="method", hue_order=methods,
                         palette=palette, estimator=None, errorbar=None, legend=False,
                         ax=ax, linewidth=1)
            if logscale:
                ax.set_yscale("log")
            ax.set_title(layer, fontsize="small")
            ax.set_xlabel("index")
            ax.set_ylabel("singular value")
            ax.label_outer()
        _legend(figure, methods, palette, lines=True)
        figure.suptitle(f"Singular values of merged weights — {domain}")
        yield f"spectra_{domain}", figure


def figure_builders(results: pd.DataFrame, spectra: pd.DataFrame | None, palette: Palette,
                    notes: list[str], stats: StatsOptions = DEFAULT
                    ) -> list[tuple[str, str, Callable[[], Figures]]]:
    """(name, what it needs, builder) of every figure kind."""
    return [
        ("clean-vs-adversarial bars", "main methods with clean and linf/l2 rows",
         lambda: clean_vs_adversarial(results, palette, stats)),
        ("accuracy-vs-eps curves", "main methods with linf/l2 rows",
         lambda: eps_curves(results, palette, stats)),
        ("ablation, merging and pool bars", "their methods with clean or linf/l2 rows",
         lambda: table_bars(results, palette, stats)),
        ("corruption bars", "main methods with corruption rows",
         lambda: corruption_bars(results, palette, notes, stats)),
        ("singular-value spectra", "a spectra table",
         lambda: iter(()) if spectra is None else spectra_figures(spectra, palette)),
    ]


def build_figures(results: pd.DataFrame, spectra: pd.DataFrame | None,
                  out_dir: Path, stats: StatsOptions = DEFAULT) -> list[Path]:
    """Write every figure the data supports (PNG and PDF); log a note for each kind skipped."""
    require_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = set(results.method) | (set(spectra.method) if spectra is not None else set())
    palette = method_palette(methods)
    notes: list[str] = []
    paths: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        for name, needs, build in figure_builders(results, spectra, palette, notes, stats):
            made = [p for stem, figure in build() for p in save_figure(figure, out_dir, stem)]
            if not made:
                notes.append(f"{name} skipped: needs {needs}")
            paths += made
    for note in notes:
        log.warning("%s", note)
    log.info("wrote %d figure files to %s", len(paths), out_dir)
    return paths



def build_training_figures(logs: Sequence[Path], root: Path, out_dir: Path,
                           validation_logs: Sequence[Path] = ()) -> list[Path]:
    """Training curves (``amt.report.training``), with validation and kept epochs, as PNG and
    PDF."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        return [p for stem, figure in training_figures(logs, root, validation_logs=validation_logs)
                for p in save_figure(figure, out_dir, stem)]
