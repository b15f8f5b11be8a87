"""Tables: every spec built from synthetic results, numbers checked against numpy."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import BENCHMARKS, paper_results, synthetic_results

from amt.registry import COMPONENTS, METHODS, TRAINED, MethodEntry, TrainedEntry, components
from amt.report.tables import PAPER_TABLES, TABLES, TableSpec, build_tables
from amt.rows import validate_results
from amt.specs import StatsOptions


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return synthetic_results()


@pytest.fixture(scope="module")
def built(results: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tables")
    build_tables(results, out)
    return out


def markdown_cells(path: Path) -> dict[tuple[str, str], str]:
    """(row label, column label) -> cell text without bold markers."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:
        values = [c.strip() for c in line.strip("|").split("|")]
        for column, value in zip(header[1:], values[1:], strict=True):
            cells[values[0], column] = value.replace("**", "")
    return cells


def expected_cell(values: np.ndarray, signed: bool = False) -> str:
    mean = f"{100 * values.mean():+.2f}" if signed else f"{100 * values.mean():.2f}"
    return f"{mean} ± {100 * 1.96 * np.std(values, ddof=1) / math.sqrt(len(values)):.2f}"


def _episodes(results: pd.DataFrame, method: str, domain: str, **condition) -> pd.Series:
    rows = results[(results.benchmark == "builtin") & (results.setting == "5w1s")
                   & (results.method == method) & (results.domain == domain)]
    for column, value in condition.items():
        rows = rows[rows[column] == value]
    return rows.set_index("episode")["accuracy"].sort_index()


def test_every_spec_is_written_in_three_formats(built: Path) -> None:
    for spec in TABLES:
        stems = {p.stem for p in built.glob(f"{spec.name}_*.md")}
        assert stems, f"no {spec.name} table"
        for stem in stems:
            assert (built / f"{stem}.csv").is_file() and (built / f"{stem}.tex").is_file()
    # (a) one per (benchmark, setting); (b) one per eps; 2 benchmarks x 2 settings
    assert len(list(built.glob("clean_*.md"))) == 4
    assert len(list(built.glob("adversarial_*.md"))) == 8
    assert (built / "adversarial_builtin_dino_5w1s_pgd_linf_2-255.md").is_file()


def test_index_lists_every_table_and_the_notes(built: Path) -> None:
    index = (built / "tables.md").read_text()
    assert "std of ddof=1" in index and "± √(Σ CI²) / domains" in index  # the defaults
    linked = set(re.findall(r"- \[([^\]]+)\]\(\1\.md\)", index))
    assert linked == {p.stem for p in built.glob("*.md")} - {"tables"}
    assert "methods without results: pmf, amt_ft" in index  # main methods not in the results


def test_clean_cells_equal_mean_and_ci_over_episodes(built: Path, results: pd.DataFrame) -> None:
    cells = markdown_cells(built / "clean_builtin_dino_5w1s_clean.md")
    for method, label in (("pm", "PM"), ("lora", "LoRA"), ("amt", "AMT")):
        per_domain = []
        for domain in ("glyphs", "mnist", "digits", "animals"):
            values = _episodes(results, method, domain, attack="none").to_numpy()
            assert cells[label, domain] == expected_cell(values)
            per_domain.append(values)
        ood = per_domain[1:]  # glyphs is the in-domain source
        mean = np.mean([v.mean() for v in ood])
        ci = math.sqrt(sum((1.96 * np.std(v, ddof=1) / math.sqrt(len(v))) ** 2 for v in ood)) / 3
        assert cells[label, "out-of-domain avg"] == f"{100 * mean:.2f} ± {100 * ci:.2f}"
    assert ("PM", "in-domain avg") not in cells  # a single in-domain domain needs no average


def test_the_releases_statistics_population_std_or_mean_of_cis(tmp_path: Path,
                                                               results: pd.DataFrame) -> None:
    """report: {std_ddof: 0, average_ci: mean}: cells with np.std, the average's CI the mean
    of the domains' CIs; tables.md says which statistics it used."""
    build_tables(results, tmp_path, stats=StatsOptions(std_ddof=0, average_ci="mean"))
    cells = markdown_cells(tmp_path / "clean_builtin_dino_5w1s_clean.md")
    ood = [_episodes(results, "amt", d, attack="none").to_numpy()
           for d in ("mnist", "digits", "animals")]
    cis = [1.96 * np.std(v) / math.sqrt(len(v)) for v in ood]
    assert cells["AMT", "mnist"] == f"{100 * ood[0].mean():.2f} ± {100 * cis[0]:.2f}"
    mean = np.mean([v.mean() for v in ood])
    assert cells["AMT", "out-of-domain avg"] == f"{100 * mean:.2f} ± {100 * np.mean(cis):.2f}"
    index = (tmp_path / "tables.md").read_text()
    assert "std of ddof=0" in index and "the mean of the per-domain CIs" in index
    assert "√(Σ CI²)" not in index


def test_adversarial_cells_use_the_chosen_eps(built: Path, results: pd.DataFrame) -> None:
    cells = markdown_cells(built / "adversarial_builtin_dino_5w1s_pgd_linf_4-255.md")
    values = _episodes(results, "amt", "mnist", norm="linf", eps=4 / 255).to_numpy()
    assert cells["AMT", "mnist"] == expected_cell(values)


def test_best_per_column_is_bold(built: Path) -> None:
    lines = [line for line in (built / "clean_bscd_dino_5w5s_clean.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| Method")]
    rows = [[c.strip() for c in line.strip("|").split("|")][1:] for line in lines]
    for column in zip(*rows, strict=True):
        means = [float(c.replace("**", "").split(" ± ")[0]) for c in column]
        bold = [c.startswith("**") for c in column]
        assert bold == [m == max(means) for m in means]


@pytest.mark.parametrize(("reference", "label"), [("pm", "PM"), ("lora", "LoRA")])
def test_difference_cells_are_paired_on_episodes(built: Path, results: pd.DataFrame,
                                                 reference: str, label: str) -> None:
    table = built / f"difference_vs_{reference}_builtin_dino_5w1s_pgd_linf_2-255.md"
    cells = markdown_cells(table)
    condition = {"norm": "linf", "eps": 2 / 255}
    diff = (_episodes(results, "amt", "digits", **condition)
            - _episodes(results, reference, "digits", **condition)).to_numpy()
    assert cells["AMT", "digits"] == expected_cell(diff, signed=True)
    assert (label, "digits") not in cells  # the reference is not a row
    assert {row for row, _ in cells} == {"PM", "LoRA", "AMT", "AMT w/o TTM", "weight average",
                                         "uniform pool", "AMT (authors' release)",
                                         "AMT (λ_adv = 3)", "AMT (λ_adv = 0.5)",
                                         "AMT, weight-space perturbation"} - {label}
    assert f"minus {label}" in table.read_text()


def test_conditions_layout_averages_targets_per_condition(built: Path,
                                                          results: pd.DataFrame) -> None:
    cells = markdown_cells(built / "ablation_bscd_dino_5w1s.md")
    assert {c for _, c in cells} == {"clean", "PGD ℓ∞ ε=2/255", "PGD ℓ∞ ε=4/255"}
    rows = results[(results.benchmark == "bscd") & (results.setting == "5w1s")
                   & (results.method == "amt_no_ttm") & (results.eps == 4 / 255)]
    per_domain = [rows.accuracy[rows.domain == d].to_numpy() for d in ("eurosat", "isic", "chestx")]
    mean = np.mean([v.mean() for v in per_domain])
    ci = math.sqrt(sum((1.96 * np.std(v, ddof=1) / math.sqrt(10)) ** 2 for v in per_domain)) / 3
    assert cells["AMT w/o TTM", "PGD ℓ∞ ε=4/255"] == f"{100 * mean:.2f} ± {100 * ci:.2f}"
    assert ("AMT", "clean") in cells  # the anchor row
    pool = markdown_cells(built / "pool_bscd_dino_5w1s.md")
    assert {r for r, _ in pool} == {"separate pool (AMT)", "uniform pool"}


def test_csv_holds_the_markdown_numbers(built: Path) -> None:
    frame = pd.read_csv(built / "clean_builtin_dino_5w1s_clean.csv").set_index("method")
    cells = markdown_cells(built / "clean_builtin_dino_5w1s_clean.md")
    mean, ci = cells["LoRA", "mnist"].split(" ± ")
    assert f"{frame.loc['lora', 'mnist_mean']:.2f}" == mean
    assert f"{frame.loc['lora', 'mnist_ci']:.2f}" == ci
    assert frame.loc["lora", "mnist_n"] == 10


def test_latex_is_well_formed(built: Path) -> None:
    for path in built.glob("*.tex"):
        text = path.read_text()
        unescaped = re.sub(r"\\[{}]", "", text)
        assert unescaped.count("{") == unescaped.count("}"), path.name
        assert text.count(r"\begin{") == text.count(r"\end{"), path.name
        rows = [line for line in text.splitlines() if line.endswith(r"\\")]
        columns = len(re.search(r"\\begin\{tabular\}\{(lc*)\}", text).group(1))
        for row in rows:  # a \multicolumn{k} cell spans k columns
            spans = sum(int(k) - 1 for k in re.findall(r"\\multicolumn\{(\d+)\}", row))
            assert row.count("&") - row.count(r"\&") + spans == columns - 1, (path.name, row)
            assert row.count("$") % 2 == 0, (path.name, row)
        assert "_" not in re.sub(r"\\_|\\label\{[^}]*\}", "", text), path.name


def test_missing_cells_are_dashes_with_a_note(tmp_path: Path, results: pd.DataFrame,
                                              caplog: pytest.LogCaptureFixture) -> None:
    gap = (results.method == "amt") & (results.domain == "digits")
    with caplog.at_level(logging.WARNING):
        build_tables(results[~gap].reset_index(drop=True), tmp_path)
    cells = markdown_cells(tmp_path / "clean_builtin_dino_5w1s_clean.md")
    assert cells["AMT", "digits"] == "–" and cells["AMT", "out-of-domain avg"] == "–"
    assert cells["AMT", "mnist"] != "–"
    note = ("table clean_builtin_dino_5w1s_clean: cells without results (shown as –): "
            "amt: digits, out-of-domain avg")
    assert note in caplog.text and note in (tmp_path / "tables.md").read_text()
    assert r"AMT & $" in (tmp_path / "clean_builtin_dino_5w1s_clean.tex").read_text()


def test_table_with_all_methods_absent_is_skipped_with_a_note(
        tmp_path: Path, results: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    main_only = results[results.method.isin(["pm", "lora", "amt"])].reset_index(drop=True)
    with caplog.at_level(logging.WARNING):
        paths = build_tables(main_only, tmp_path)
    for name in ("ablation", "merging", "pool"):
        assert not list(tmp_path.glob(f"{name}_*")), name
        assert f"table '{name}' skipped: none of its methods" in caplog.text
    assert "table 'pool' skipped" in (tmp_path / "tables.md").read_text()
    for name in ("paper_ablation", "paper_merging", "paper_pool"):  # their paper layouts too
        assert not list(tmp_path.glob(f"{name}_*")), name
    # clean and adversarial tables, the differences against pm and against lora, then the
    # paper's Table 1, adversarial and corruption tables
    assert tmp_path / "tables.md" in paths and len(paths) == 1 + 3 * (4 + 8 + 2 * 12 + 3 * 4)


def test_difference_without_reference_is_skipped(tmp_path: Path, results: pd.DataFrame,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_tables(results, tmp_path, references=("pmf",),
                     specs=[spec for spec in TABLES if spec.difference])
    assert not list(tmp_path.glob("difference_*"))
    assert "table 'difference_vs_pmf' skipped: needs the reference method 'pmf'" in caplog.text
    with pytest.raises(ValueError, match="expected one or more, each once"):
        build_tables(results, tmp_path, references=("pm", "pm"))


def test_only_clean_rows_gives_no_adversarial_table(tmp_path: Path,
                                                    results: pd.DataFrame) -> None:
    clean = validate_results(results[results.norm == "none"])
    build_tables(clean, tmp_path)
    assert list(tmp_path.glob("clean_*.md")) and not list(tmp_path.glob("adversarial_*"))
    assert "table 'adversarial' skipped" in (tmp_path / "tables.md").read_text()


def test_spec_rejects_impossible_layouts() -> None:
    with pytest.raises(ValueError, match="layout 'rows'"):
        TableSpec("x", "x", ("pm",), ("clean",), layout="rows")
    with pytest.raises(ValueError, match="methods must be None exactly when"):
        TableSpec("x", "x", ("pm",), ("clean",), difference=True)
    with pytest.raises(ValueError, match="differences need layout domains"):
        TableSpec("x", "x", None, ("clean",), layout="conditions", difference=True)


def test_methods_outside_every_accuracy_table_are_noted(tmp_path: Path,
                                                        results: pd.DataFrame) -> None:
    renamed = results.assign(method=results.method.replace({"lora": "unregistered"}))
    build_tables(renamed, tmp_path, specs=TABLES)
    index = (tmp_path / "tables.md").read_text()
    assert "methods in no accuracy table (see the difference tables): unregistered" in index
    assert "corruption rows are shown in the corruption figures" in index
    assert "unregistered" in (tmp_path / "difference_vs_pm_bscd_dino_5w5s_clean.md").read_text()
    # the paper's tables show every method no ablation table lists, and the corruptions
    build_tables(renamed, tmp_path / "paper")
    index = (tmp_path / "paper" / "tables.md").read_text()
    assert "methods in no accuracy table" not in index and "corruption figures" not in index
    assert "| unregistered |" in (tmp_path / "paper" / "table1_bscd_dino_5w5s_clean.md").read_text()



# -- the paper's layouts --------------------------------------------------------------------------
PMF_ADV = MethodEntry("pmf_adv", "PMF (Adv. TTF)", "pm", finetune=True, ft_adversarial=True)


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """The paper's tables of paper_results, with pmf_adv registered as a new method would be."""
    out, results = tmp_path_factory.mktemp("paper"), paper_results()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "pmf_adv", PMF_ADV)
        build_tables(results, out, specs=PAPER_TABLES)
    return out, results


def _ood(results: pd.DataFrame, method: str, benchmark: str = "builtin", **condition
         ) -> tuple[float, float]:
    """(mean, pooled CI) in % of a method's out-of-domain average, 5w1s."""
    found = []
    for domain in BENCHMARKS[benchmark][1:]:
        rows = results[(results.benchmark == benchmark) & (results.setting == "5w1s")
                       & (results.method == method) & (results.domain == domain)]
        for column, value in condition.items():
            rows = rows[rows[column] == value]
        found.append(rows.groupby("episode").accuracy.mean().to_numpy())
    ci = math.sqrt(sum((1.96 * np.std(v, ddof=1) / math.sqrt(len(v))) ** 2 for v in found))
    return 100 * np.mean([v.mean() for v in found]), 100 * ci / len(found)


def _text(mean_ci: tuple[float, float]) -> str:
    return f"{mean_ci[0]:.2f} ± {mean_ci[1]:.2f}"


def _rows(path: Path) -> list[str]:
    """The first cell of every body row, row-group lines included."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [line.strip("|").split("|")[0].strip() for line in lines[1:]]


def test_every_paper_table_is_written_per_benchmark_and_setting(paper) -> None:
    out, _ = paper
    for name in ("table1", "paper_adversarial", "corruptions", "paper_ablation",
                 "paper_merging", "paper_pool", "paper_release"):
        stems = {p.stem for p in out.glob(f"{name}_*.md")}
        assert len(stems) == 4, name  # builtin and bscd (a BSCD-FSL-like benchmark) x 2 settings
        for stem in stems:
            assert (out / f"{stem}.csv").is_file() and (out / f"{stem}.tex").is_file()


def test_table1_groups_rows_by_test_time_fine_tuning(paper) -> None:
    """Rows: the methods no ablation table lists, without TTF then with TTF (registry facts:
    pmf_adv, registered by the test, falls into place); domains, then the OOD average."""
    out, results = paper
    path = out / "table1_builtin_dino_5w1s_clean.md"
    assert _rows(path) == ["*without TTF*", "PM", "LoRA", "AMT", "*with TTF*", "PMF",
                           "PMF (Adv. TTF)", "AMT-FT"]  # the registry's order
    cells = markdown_cells(path)
    amt_ft = _episodes(results, "amt_ft", "digits", attack="none").to_numpy()
    assert cells["AMT-FT", "digits"] == expected_cell(amt_ft)
    assert cells["PMF", "out-of-domain avg"] == _text(_ood(results, "pmf", attack="none"))
    frame = pd.read_csv(out / "table1_builtin_dino_5w1s_clean.csv").set_index("method")
    assert frame.loc["amt_ft", "group"] == "with TTF" and frame.loc["pm", "group"] == \
        "without TTF"
    tex = (out / "table1_builtin_dino_5w1s_clean.tex").read_text()
    assert r"\multicolumn{6}{l}{\textit{with TTF}} \\" in tex


def test_adversarial_table_has_condition_groups_and_adversarial_ttf_rows(paper) -> None:
    out, results = paper
    path = out / "paper_adversarial_builtin_dino_5w1s.md"
    assert _rows(path) == ["*without Adv. TTF*", "PM", "PMF", "LoRA", "AMT", "AMT-FT",
                           "*with Adv. TTF*", "PMF (Adv. TTF)"]
    cells = markdown_cells(path)
    assert {c for _, c in cells} == {f"{g}: {d}" for g in ("clean", "PGD ℓ∞ ε=2/255",
                                                           "PGD ℓ∞ ε=4/255")
                                     for d in ("glyphs", "out-of-domain avg")}
    assert cells["PMF (Adv. TTF)", "PGD ℓ∞ ε=4/255: out-of-domain avg"] == \
        _text(_ood(results, "pmf_adv", norm="linf", eps=4 / 255))
    glyphs = _episodes(results, "amt", "glyphs", norm="linf", eps=2 / 255).to_numpy()
    assert cells["AMT", "PGD ℓ∞ ε=2/255: glyphs"] == expected_cell(glyphs)
    tex = (out / "paper_adversarial_builtin_dino_5w1s.tex").read_text()
    assert r"& \multicolumn{2}{c}{clean} & \multicolumn{2}{c}{PGD" in tex
    assert r"\cmidrule(lr){2-3} \cmidrule(lr){4-5} \cmidrule(lr){6-7}" in tex


def test_ablation_marks_come_from_the_registry(paper) -> None:
    out, results = paper
    cells = markdown_cells(out / "paper_ablation_bscd_dino_5w1s.md")
    marks = {row: "".join(cells[row, c] for c in COMPONENTS)
             for row in ("AMT", "AMT w/o TTM", "AMT w/o STr")}
    assert marks == {"AMT": "✓✓✓✓✓", "AMT w/o TTM": "✓✓✓✗✗", "AMT w/o STr": "✓✓✓✓✗"}
    assert cells["AMT w/o STr", "clean: out-of-domain avg"] == \
        _text(_ood(results, "amt_no_str", "bscd", attack="none"))
    frame = pd.read_csv(out / "paper_ablation_bscd_dino_5w1s.csv").set_index("method")
    assert not frame.loc["amt_no_ttm", "TTM"] and frame.loc["amt_no_ttm", "APQ"]
    assert r"AMT w/o STr & \checkmark & \checkmark & \checkmark & \checkmark & $\times$ &" in \
        (out / "paper_ablation_bscd_dino_5w1s.tex").read_text()
    assert "APQ" not in (out / "paper_merging_bscd_dino_5w1s.md").read_text()


def test_a_trained_variants_switches_clear_its_marks(monkeypatch) -> None:
    """An APQ-off pool (a TrainedEntry whose switches set apq false) is marked APQ ✗."""
    monkeypatch.setitem(TRAINED, "amt_no_apq",
                        TrainedEntry("amt_no_apq", "amt", pooled=True, switches=(("apq", False),)))
    monkeypatch.setitem(METHODS, "amt_no_apq", MethodEntry("amt_no_apq", "AMT w/o APQ",
                                                           "amt_no_apq", "pool", combine="ttm",
                                                           trim=True))
    assert components("amt_no_apq") == {"APQ": False, "APSV": True, "RLP": True, "TTM": True,
                                        "STr": True}
    assert components("lora") == dict.fromkeys(COMPONENTS, False)


def test_corruption_table_means_over_severities_and_corruptions(paper) -> None:
    """Columns: each corruption's severities and their mean, then the mean over all; a mean
    is taken per episode first (one paired quantity), then over the out-of-domain targets."""
    out, results = paper
    path = out / "corruptions_builtin_dino_5w1s.md"
    assert _rows(path)[:4] == ["*without TTF*", "PM", "LoRA", "AMT"]
    cells = markdown_cells(path)
    assert [c for r, c in cells if r == "AMT"] == [
        "contrast: s1", "contrast: s3", "contrast: mean", "gaussian noise: s1",
        "gaussian noise: s3", "gaussian noise: mean", "all corruptions: mean"]
    noise = results.attack == "gaussian_noise"
    assert cells["AMT", "gaussian noise: s3"] == _text(_ood(results[noise], "amt", eps=3.0))
    assert cells["AMT", "gaussian noise: mean"] == _text(_ood(results[noise], "amt"))
    assert cells["AMT", "all corruptions: mean"] == \
        _text(_ood(results, "amt", norm="corruption"))


def test_paper_tables_without_their_rows_are_skipped_with_a_note(tmp_path: Path) -> None:
    results = paper_results(episodes=2)
    clean = validate_results(results[(results.norm == "none")
                                     & results.method.isin(["pm", "amt"])])
    build_tables(clean, tmp_path, specs=PAPER_TABLES)
    index = (tmp_path / "tables.md").read_text()
    assert "table 'corruptions' skipped: none of its methods ['pm', 'amt'] has corruption " \
           "results" in index
    assert "table 'paper_ablation' skipped" in index
    assert list(tmp_path.glob("table1_*.md")) and list(tmp_path.glob("paper_adversarial_*.md"))



def test_the_lambda_table_lists_the_sweeps_methods_by_value(built: Path) -> None:
    cells = markdown_cells(built / "lambda_builtin_dino_5w1s.md")
    rows = list(dict.fromkeys(row for row, _ in cells))
    assert rows == ["AMT (train.amt.lambda_adv)", "AMT (λ_adv = 0.5)", "AMT (λ_adv = 3)"]
    perturbation = markdown_cells(built / "perturbation_builtin_dino_5w1s.md")
    assert list(dict.fromkeys(row for row, _ in perturbation)) == \
        ["AMT (spectral APSV, SVD init)", "AMT, weight-space perturbation"]
