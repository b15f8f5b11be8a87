"""Training curves from the pipeline's logs: pretraining per epoch, meta-tuning per episode.

A log is named by its folder relative to the results root: ``backbones/<backbone>`` holds a
pretraining log (epoch, loss, acc, ...), ``models/<backbone>/<setting>/<run...>`` a meta-tuning
log (episode, loss, acc, adv_acc, ...) and its validation log (epoch, episode, acc, kept: one
row per validated epoch, none without validation). Meta-tuning curves are running means over
``window`` episodes, one figure per (backbone, setting) with every run in it; each run's
validation accuracy is drawn per epoch, and the epoch whose weights it kept is marked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from amt.rows import ResultsError

PRETRAIN_COLUMNS = ("epoch", "loss", "acc")
META_COLUMNS = ("episode", "loss", "acc", "adv_acc")
VALID_COLUMNS = ("epoch", "episode", "acc", "kept")
_LAYOUTS = {"backbones": (2, PRETRAIN_COLUMNS), "models": (4, META_COLUMNS)}


def read_log(path: Path, root: Path, validation: bool = False
             ) -> tuple[tuple[str, ...], pd.DataFrame]:
    """(the log's folder relative to ``root`` as parts, its rows); a log outside ``root``, of
    another layout or missing columns is an error naming the file. A validation log
    (``validation``) is a meta-tuning run's and may have no rows."""
    path, root = Path(path), Path(root)
    try:
        parts = path.parent.resolve().relative_to(root.resolve()).parts
    except ValueError as err:
        raise ResultsError(f"{path}: not under the results root {root}") from err
    layouts = {"models": (4, VALID_COLUMNS)} if validation else _LAYOUTS
    if not parts or parts[0] not in layouts or len(parts) < layouts[parts[0]][0]:
        raise ResultsError(f"{path}: expected " + " or ".join(
            {"backbones": "backbones/<backbone>/",
             "models": "models/<backbone>/<setting>/<run>/"}[k] for k in layouts)
            + f" under {root}")
    frame = pd.read_csv(path)
    missing = [c for c in layouts[parts[0]][1] if c not in frame.columns]
    if missing or (frame.empty and not validation):
        raise ResultsError(f"{path}: missing columns {missing} or no rows")
    return parts, frame


def training_figures(paths: Sequence[Path], root: Path, window: int = 10,
                     validation_logs: Sequence[Path] = ()) -> Iterator[tuple[str, Figure]]:
    """(file stem, figure) for each backbone's pretraining and each (backbone, setting)."""
    validations = dict(read_log(path, root, validation=True) for path in validation_logs)
    runs: dict[tuple[str, ...], list[tuple[str, pd.DataFrame, pd.DataFrame | None]]] = {}
    for path in paths:
        parts, frame = read_log(path, root)
        if parts[0] == "backbones":
            yield f"training_pretrain_{parts[1]}", _pretrain_figure(parts[1], frame)
        else:
            runs.setdefault(parts[1:3], []).append(("/".join(parts[3:]), frame,
                                                    validations.get(parts)))
    for (backbone, setting), logs in sorted(runs.items(), key=lambda item: item[0]):
        yield (f"training_{backbone}_{setting}",
               _meta_figure(f"{backbone} · {setting}", sorted(logs, key=lambda r: r[0]),
                            window))


def _pretrain_figure(backbone: str, frame: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(8, 3), layout="constrained")
    left, right = figure.subplots(1, 2)
    epochs = frame.epoch + 1
    left.plot(epochs, frame.loss, marker="o")
    right.plot(epochs, 100 * frame.acc, marker="o")
    for ax, label in ((left, "train loss"), (right, "train accuracy (%)")):
        ax.set(xlabel="epoch", ylabel=label)
    figure.suptitle(f"Supervised pretraining of {backbone}")
    return figure


def _meta_figure(title: str, logs: list[tuple[str, pd.DataFrame, pd.DataFrame | None]],
                 window: int) -> Figure:
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    validated = False
    for i, (run, frame, validation) in enumerate(logs):
        colour = f"C{i % 10}"
        smooth = frame[["loss", "acc", "adv_acc"]].rolling(window, min_periods=1).mean()
        left.plot(frame.episode, smooth.loss, color=colour, label=run)
        right.plot(frame.episode, 100 * smooth.acc, color=colour, label=run)
        if frame.adv_acc.notna().any():
            right.plot(frame.episode, 100 * smooth.adv_acc, color=colour, linestyle="--")
        if validation is not None and not validation.empty:
            validated = True
            _mark_validation(left, right, validation, colour)
    left.set(xlabel="episode", ylabel=f"loss (mean of {window})")
    right.set(xlabel="episode", ylabel="query accuracy (%); dashed: attacked" +
              ("\ndotted: validation, ★ and line: kept epoch" if validated else ""))
    right.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    figure.suptitle(f"Meta-tuning — {title}")
    return figure


def _mark_validation(left, right, validation: pd.DataFrame, colour: str) -> None:
    """The run's validation accuracy per epoch (dotted), and its kept epoch (a star on it, a
    vertical line through both panels)."""
    right.plot(validation.episode, 100 * validation.acc, color=colour, linestyle=":",
               marker="o", markersize=3)
    kept = validation[validation.kept == 1]
    right.plot(kept.episode, 100 * kept.acc, color=colour, linestyle="none", marker="*",
               markersize=12)
    for ax in (left, right):
        for episode in kept.episode:
            ax.axvline(episode, color=colour, linestyle="-.", linewidth=0.8)
