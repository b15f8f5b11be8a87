"""Figures under the installed pandas 3 + seaborn: drawn values read back and checked."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_results, synthetic_spectra
from matplotlib.colors import to_rgb
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from amt.report.figures import (
    build_figures,
    clean_vs_adversarial,
    corruption_bars,
    eps_curves,
    method_palette,
    spectra_figures,
    table_bars,
)
from amt.report.tables import TABLES, spec_tables
from amt.rows import parse_spectra

DOMAINS = ["glyphs", "mnist", "digits", "animals"]
MAIN = ["pm", "lora", "amt"]


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    """One (benchmark, backbone, setting) group of the synthetic results."""
    results = synthetic_results()
    return results[(results.benchmark == "builtin") & (results.setting == "5w1s")] \
        .reset_index(drop=True)


@pytest.fixture(scope="module")
def palette(small: pd.DataFrame) -> dict:
    return method_palette(set(small.method))


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    return 100 * values.mean(), 100 * 1.96 * np.std(values, ddof=1) / math.sqrt(len(values))


def _accuracy(frame: pd.DataFrame, **where) -> np.ndarray:
    for column, value in where.items():
        frame = frame[frame[column] == value]
    return frame.sort_values("episode").accuracy.to_numpy()


def _bars(ax) -> list[list]:
    return [list(c) for c in ax.containers if isinstance(c, BarContainer)]


def _whiskers(ax) -> dict[float, tuple[float, float]]:
    """Bar centre -> (low, high) of its CI whisker."""
    ends = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            (x, low), (_, high) = container.lines[2][0].get_segments()[0]
            ends[round(float(x), 6)] = (low, high)
    return ends


def test_results_use_pandas3_string_columns(small: pd.DataFrame) -> None:
    # the seaborn#3893 situation: string columns are not object dtype
    assert pd.api.types.is_string_dtype(small.method) and small.method.dtype != object


def test_clean_vs_adversarial_bars_whiskers_and_colours(small: pd.DataFrame,
                                                        palette: dict) -> None:
    [(stem, figure)] = list(clean_vs_adversarial(small, palette))
    assert stem == "clean_vs_adv_builtin_dino_5w1s"
    assert [ax.get_title() for ax in figure.axes] == ["clean", "PGD ℓ∞ ε=2/255", "PGD ℓ∞ ε=4/255"]
    for ax, where in zip(figure.axes, [{"norm": "none"}, {"eps": 2 / 255}, {"eps": 4 / 255}],
                         strict=True):
        whiskers = _whiskers(ax)
        for method, bars in zip(MAIN, _bars(ax), strict=True):
            for domain, bar in zip(DOMAINS, bars, strict=True):
                mean, ci = _mean_ci(_accuracy(small, method=method, domain=domain, **where))
                centre = round(bar.get_x() + bar.get_width() / 2, 6)
                assert bar.get_height() == pytest.approx(mean)
                assert whiskers[centre] == pytest.approx((mean - ci, mean + ci))
                assert bar.get_facecolor()[:3] == pytest.approx(palette[method])
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["PM", "LoRA", "AMT"]
    assert figure.axes[0].get_ylabel() == "Accuracy (%)"


def test_eps_curves_lines_and_ci_bands(small: pd.DataFrame, palette: dict) -> None:
    [(stem, figure)] = list(eps_curves(small, palette))
    assert stem == "eps_curve_builtin_dino_5w1s_pgd_linf"
    ax = figure.axes[DOMAINS.index("digits")]
    assert ax.get_xlabel() == "ε (×1/255, ℓ∞)"
    by_colour = {to_rgb(line.get_color()): line for line in ax.lines}
    for method in MAIN:
        line = by_colour[tuple(palette[method])]
        assert list(line.get_xdata()) == pytest.approx([0, 2, 4])
        expected = [_mean_ci(_accuracy(small, method=method, domain="digits", eps=eps))
                    for eps in (0, 2 / 255, 4 / 255)]
        assert list(line.get_ydata()) == pytest.approx([m for m, _ in expected])
    # each band spans mean ± CI (not seaborn's default bootstrap interval)
    bands = [c.get_paths()[0].vertices for c in ax.collections]
    lows_at_zero = sorted(v[:, 1][v[:, 0] == 0].min() for v in bands)
    expected = sorted(m - c for m, c in (_mean_ci(_accuracy(small, method=m, domain="digits",
                                                            norm="none")) for m in MAIN))
    assert lows_at_zero == pytest.approx(expected)


def test_table_bars_show_the_table_numbers(small: pd.DataFrame, palette: dict) -> None:
    figures = dict(table_bars(small, palette))
    assert set(figures) == {"ablation_builtin_dino_5w1s", "merging_builtin_dino_5w1s",
                            "pool_builtin_dino_5w1s", "release_builtin_dino_5w1s",
                            "lambda_builtin_dino_5w1s", "perturbation_builtin_dino_5w1s"}
    spec = next(s for s in TABLES if s.name == "ablation")
    [table] = spec_tables(spec, small, [])
    ax = figures["ablation_builtin_dino_5w1s"].axes[0]
    for row, bars in zip(table.rows, _bars(ax), strict=True):
        heights = [bar.get_height() for bar in bars]
        assert heights == pytest.approx([100 * table.cells[row, c].mean for c in table.columns])
    assert [t.get_text() for t in ax.get_xticklabels()] == table.column_labels


def test_corruption_bars_average_severities_per_episode(small: pd.DataFrame, palette: dict) -> None:
    [(stem, figure)] = list(corruption_bars(small, palette, []))
    assert stem == "corruptions_builtin_dino_5w1s"
    ax = figure.axes[DOMAINS.index("mnist")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "contrast", "gaussian noise"]
    rows = small[small.domain == "mnist"]
    amt = _bars(ax)[MAIN.index("amt")]
    severities = np.mean([_accuracy(rows, method="amt", attack="contrast", eps=s)
                          for s in (1.0, 3.0)], axis=0)
    assert amt[1].get_height() == pytest.approx(_mean_ci(severities)[0])
    assert amt[0].get_height() == pytest.approx(_mean_ci(_accuracy(rows, method="amt",
                                                                   norm="none"))[0])


def test_uneven_severities_are_noted(small: pd.DataFrame, palette: dict) -> None:
    drop = (small.method == "pm") & (small.attack == "contrast") & (small.eps == 3.0)
    notes: list[str] = []
    list(corruption_bars(small[~drop], palette, notes))
    assert any("contrast severities differ by method" in n for n in notes)


def test_spectra_panels_per_layer_and_lines_per_method() -> None:
    spectra = parse_spectra(synthetic_spectra(layers=3).astype(str), "synthetic")
    palette = method_palette(set(spectra.method))
    figures = dict(spectra_figures(spectra, palette))
    assert set(figures) == {"spectra_mnist", "spectra_eurosat"}
    axes = figures["spectra_mnist"].axes
    assert [ax.get_title() for ax in axes] == [f"blocks.{i}.mlp.fc1" for i in range(3)]
    assert all(ax.get_yscale() == "log" and len(ax.lines) == 3 for ax in axes)
    amt = spectra[(spectra.domain == "mnist") & (spectra.method == "amt")
                  & (spectra.layer == "blocks.1.mlp.fc1")].singular_value.to_numpy()
    line = next(ln for ln in axes[1].lines if to_rgb(ln.get_color()) == tuple(palette["amt"]))
    assert list(line.get_ydata()) == pytest.approx(list(amt))


def test_build_figures_writes_png_and_pdf(tmp_path: Path, small: pd.DataFrame,
                                          caplog: pytest.LogCaptureFixture) -> None:
    two_domains = small[small.domain.isin(["glyphs", "mnist"])]  # fewer panels, faster
    with caplog.at_level(logging.WARNING):
        paths = build_figures(two_domains, None, tmp_path)
    stems = {p.stem for p in paths}
    assert stems == {"clean_vs_adv_builtin_dino_5w1s", "eps_curve_builtin_dino_5w1s_pgd_linf",
                     "ablation_builtin_dino_5w1s", "merging_builtin_dino_5w1s",
                     "pool_builtin_dino_5w1s", "release_builtin_dino_5w1s",
                     "lambda_builtin_dino_5w1s", "perturbation_builtin_dino_5w1s",
                     "corruptions_builtin_dino_5w1s"}
    assert len(paths) == 2 * len(stems)
    for path in paths:
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.width > 400 and image.height > 200
        else:
            assert path.read_bytes().startswith(b"%PDF")
    assert "singular-value spectra skipped: needs a spectra table" in caplog.text


def test_figures_without_data_are_skipped_with_notes(tmp_path: Path, small: pd.DataFrame,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    clean = small[(small.norm == "none") & small.method.isin(MAIN)].reset_index(drop=True)
    with caplog.at_level(logging.WARNING):
        assert build_figures(clean, None, tmp_path) == []
    for kind in ("clean-vs-adversarial bars", "accuracy-vs-eps curves",
                 "ablation, merging and pool bars", "corruption bars"):
        assert f"{kind} skipped: needs" in caplog.text
    assert not list(tmp_path.iterdir())


def _write_log(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def test_training_curves_from_pipeline_logs(tmp_path):
    from amt.report.figures import build_training_figures
    from amt.report.training import training_figures

    root = tmp_path / "results"
    pretrain = _write_log(root / "backbones" / "small_vit" / "train_log.csv", pd.DataFrame(
        {"epoch": [0, 1, 2], "loss": [6.7, 5.0, 4.0], "acc": [0.0, 0.1, 0.3]}))
    episodes = np.arange(30)
    meta = {"episode": episodes, "loss": 2 - episodes / 30, "acc": 0.5 + episodes / 100}
    runs = {"lora": np.nan, "amt_separate/member0": 0.4 + episodes / 100}
    logs = [_write_log(root / "models" / "small_vit" / "5w1s" / run / "train_log.csv",
                       pd.DataFrame({**meta, "adv_acc": adv})) for run, adv in runs.items()]
    # lora validated before training and after each of 3 epochs of 10 episodes, epoch 2 kept;
    # the member without validation rows (a run without train.validation)
    validation = pd.DataFrame({"epoch": [0, 1, 2, 3], "episode": [0, 10, 20, 30],
                               "acc": [0.4, 0.5, 0.7, 0.6], "kept": [0, 0, 1, 0],
                               "acc_glyphs": [0.4, 0.5, 0.7, 0.6]})
    valid_logs = [_write_log(log.parent / "valid_log.csv", frame) for log, frame in
                  zip(logs, (validation, validation.iloc[:0]), strict=True)]
    paths = build_training_figures([pretrain, *logs], root, tmp_path / "figures", valid_logs)
    assert sorted(p.name for p in paths) == [
        "training_pretrain_small_vit.pdf", "training_pretrain_small_vit.png",
        "training_small_vit_5w1s.pdf", "training_small_vit_5w1s.png"]
    (_, figure), = [item for item in training_figures(logs, root)]
    loss_ax, acc_ax = figure.axes[:2]
    lines = acc_ax.get_lines()  # every run, and amt's attacked accuracy dashed
    assert [(line.get_label(), line.get_linestyle()) for line in lines if
            not line.get_label().startswith("_")] == [("amt_separate/member0", "-"), ("lora", "-")]
    assert len(lines) == 3 and lines[1].get_linestyle() == "--" and len(loss_ax.get_lines()) == 2
    assert loss_ax.get_lines()[0].get_ydata()[-1] < loss_ax.get_lines()[0].get_ydata()[0]

    (_, marked), = [item for item in training_figures(logs, root, validation_logs=valid_logs)]
    loss_ax, acc_ax = marked.axes[:2]
    dotted = [line for line in acc_ax.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and list(dotted[0].get_ydata()) == [40, 50, 70, 60]
    star, = [line for line in acc_ax.get_lines() if line.get_marker() == "*"]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([20], [70])
    for ax in (loss_ax, acc_ax):  # the kept epoch's line through both panels, lora's colour
        kept, = [line for line in ax.get_lines() if line.get_linestyle() == "-."]
        assert list(kept.get_xdata()) == [20, 20] and kept.get_color() == dotted[0].get_color()


def test_training_log_outside_the_layout_is_named(tmp_path):
    from amt.report.training import read_log
    from amt.rows import ResultsError

    stray = _write_log(tmp_path / "results" / "elsewhere" / "train_log.csv",
                       pd.DataFrame({"epoch": [0], "loss": [1.0], "acc": [0.5]}))
    with pytest.raises(ResultsError, match=r"elsewhere/train_log\.csv: expected backbones"):
        read_log(stray, tmp_path / "results")
    broken = _write_log(tmp_path / "results" / "backbones" / "b" / "train_log.csv",
                        pd.DataFrame({"epoch": [0], "loss": [1.0]}))
    with pytest.raises(ResultsError, match=r"missing columns \['acc'\]"):
        read_log(broken, tmp_path / "results")
    no_kept = _write_log(tmp_path / "results" / "models" / "b" / "s" / "pm" / "valid_log.csv",
                         pd.DataFrame({"epoch": [0], "episode": [0], "acc": [0.5]}))
    with pytest.raises(ResultsError, match=r"missing columns \['kept'\]"):
        read_log(no_kept, tmp_path / "results", validation=True)
    with pytest.raises(ResultsError, match=r"expected models/<backbone>/<setting>/<run>/"):
        read_log(broken.with_name("valid_log.csv"), tmp_path / "results", validation=True)
