"""Per-domain hyperparameter selection: a grid search on the validation episodes.

``python -m amt select --method amt --model pool.pt --store D.h5 --episodes valid_5w1s.json
--grid '{"beta": [1, 0.5, 2], "gamma": [0.6, 0.4, 0.8], "top_k": [2, 1],
"str": ["none", {"layers": "fc1", "ratio": 0.5}]}' --out selection.json``

Grid keys: ``beta``, ``gamma``, ``top_k``, ``str`` (each value ``"none"`` or
``{"layers": "fc1" | "all", "ratio": rho}``) and ``lr`` (test-time fine-tuning; 0 = none); a
method may only use the keys it has (``amt.adapt.TUNED``). amt_ft takes its merging
hyperparameters from an amt selection (``--selection``) and selects ``lr``. Every point of the
Cartesian product (in the order given) scores the mean clean accuracy over the validation
episodes; the best wins and ties go to the earliest point, so list the defaults first. The JSON
keeps every point's mean and per-episode accuracies: how flat the grid is shows there.

Cheap: TTM's member scores do not depend on beta, gamma, top_k or STr, so they are computed once
per episode (the P members side by side); a point then costs a merge (+ STr) and one forward of
support and queries, and points giving the same merge (e.g. every beta at top_k 1) share one
evaluation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from amt import devices
from amt.adapt import (
    SELECTION_FORMAT,
    TUNED,
    FineTuned,
    Hyper,
    Method,
    PoolMethod,
    load_method,
    load_selection,
)
from amt.checkpoints import sha256, write_json_atomic
from amt.episodes import EpisodeDataset, check_episodes_fit, check_episodes_match, load_episodes
from amt.evaluate import episode_batches, image_sizes
from amt.transforms import test_transform
from data_prep.store import DomainStore

log = logging.getLogger(__name__)

GRID_KEYS = {"beta": ("beta",), "gamma": ("gamma",), "top_k": ("top_k",),
             "str": ("str_layers", "str_ratio"), "lr": ("lr",)}


def _str_value(value: object, source: str) -> dict:
    if value == "none":
        return {"str_layers": "none", "str_ratio": 1.0}
    if isinstance(value, dict) and set(value) == {"layers", "ratio"}:
        return {"str_layers": value["layers"], "str_ratio": value["ratio"]}
    raise ValueError(f"{source}: STr value {value!r}: expected \"none\" or "
                     "{\"layers\": \"fc1\" | \"all\", \"ratio\": rho}")


def grid_points(grid: object, method: str, source: str = "--grid") -> list[dict]:
    """The grid's points as Hyper keyword dicts, in product order; every key must be one the
    method uses and every value list non-empty."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{source}: expected a non-empty JSON object of value lists")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    unused = [k for k in grid if k in GRID_KEYS and not set(GRID_KEYS[k]) <= set(TUNED[method])]
    if unknown or unused:
        raise ValueError(f"{source}: keys {unknown + unused} are unknown or not used by method "
                         f"{method}, which uses {list(TUNED[method])}")
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: {key}: expected a non-empty list of values")
        axes.append([_str_value(v, source) if key == "str" else {key: v} for v in values])
    points = [{k: v for part in combo for k, v in part.items()}
              for combo in itertools.product(*axes)]
    for point in points:
        Hyper.from_dict(point, f"{source} point {point}")  # every value checked up front
    return points


@dataclass
class SelectConfig:
    """One selection job (the ``select`` command's arguments)."""

    method: str
    model: Path
    store: Path
    episodes: Path
    grid: dict
    out: Path
    base_selection: Path | None = None  # amt_ft: the amt selection holding the merge choices
    backbone_checkpoint: Path | None = None
    ft_steps: int | None = None  # None -> Hyper's default (or the base selection's)
    seed: int = 0
    image_size: int | None = None
    resize: int | None = None
    device: str = "auto"
    workers: int = 0
    amp: bool = True


def _base(config: SelectConfig, points: list[dict]) -> tuple[Hyper, list[str]]:
    """The fixed hyperparameters and the full list of selected ones; raises if the method
    uses one that neither the grid nor the base selection sets."""
    base, selected = (load_selection(config.base_selection, config.model)
                      if config.base_selection else (Hyper(), []))
    if config.ft_steps is not None:
        base = replace(base, ft_steps=config.ft_steps)
    chosen = sorted(set(selected) | set(points[0]))
    missing = [k for k in TUNED[config.method] if k not in chosen]
    if missing:
        raise ValueError(f"method {config.method} uses {missing} but neither --grid nor "
                         f"--selection {config.base_selection} sets them (a one-value list "
                         "fixes a value)")
    return base, chosen


def _pool_method(method: Method) -> PoolMethod | None:
    inner = method.base if isinstance(method, FineTuned) else method
    return inner if isinstance(inner, PoolMethod) else None


def score_grid(method: Method, points: list[dict], base: Hyper,
               batches: Iterable[tuple[int, tuple[Tensor, ...]]]) -> list[list[float]]:
    """Per point, the clean accuracy on each validation episode."""
    pool = _pool_method(method)
    scoring = pool is not None and pool.recipe.combine == "ttm"
    accuracies: list[list[float]] = [[] for _ in points]
    for index, (xs, ys, xq, yq) in batches:
        scores = pool.scores(xs, ys, index) if scoring else None  # once per episode
        memo: dict[tuple, float] = {}
        for i, point in enumerate(points):
            hyper = replace(base, **point)
            method.set_hyper(hyper)
            plan = None if pool is None else pool.plan(scores)
            key = (plan, hyper.trims and (hyper.str_layers, hyper.str_ratio), hyper.lr)
            if key not in memo:
                options = {} if plan is None else {"plan": plan}
                with method.adapt(xs, ys, index, queries=xq, **options) as adapted:
                    memo[key] = (adapted.clean_logits.argmax(-1) == yq).float().mean().item()
            accuracies[i].append(memo[key])
        log.info("validation episode %d: %d points, %d distinct evaluations", index + 1,
                 len(points), len(memo))
    return accuracies


def select(config: SelectConfig) -> dict:
    """Grid-search the validation episodes and write the choice with every point's scores."""
    started = time.perf_counter()
    points = grid_points(config.grid, config.method)
    base, selected = _base(config, points)
    device = devices.pick_device(config.device)
    store = DomainStore(config.store)
    episodes, meta = load_episodes(config.episodes)
    check_episodes_match(store, meta)
    check_episodes_fit(store, episodes, meta, config.episodes)
    method = load_method(config.method, config.model, base, device, config.amp, config.seed,
                         config.backbone_checkpoint)
    size, resize = image_sizes(method, config.image_size, config.resize, config.model)
    dataset = EpisodeDataset(store, episodes, test_transform(size, resize), config.seed)
    accuracies = score_grid(method, points, base,
                            episode_batches(dataset, config.workers, device))
    means = [float(np.mean(a)) for a in accuracies]
    best = int(np.argmax(means))  # the first of equal maxima
    chosen = replace(base, **points[best])
    result = {
        "format": SELECTION_FORMAT, "method": config.method, "selected": selected,
        "hyperparameters": asdict(chosen), "best_point": points[best],
        "best_accuracy": means[best], "grid": config.grid,
        "points": [{"point": p, "accuracy": m, "episode_accuracy": a}
                   for p, m, a in zip(points, means, accuracies, strict=True)],
        "episodes": str(config.episodes), "episodes_sha256": sha256(config.episodes),
        "validation_episodes": len(episodes), "model": str(config.model),
        "model_sha256": sha256(config.model), "base_selection": config.base_selection,
        "seed": config.seed, "image_size": size, "resize": resize,
        "device": devices.describe(device), "seconds": round(time.perf_counter() - started, 2)}
    write_json_atomic(result, config.out)
    log.info("%s: chose %s (accuracy %.4f; grid range %.4f-%.4f over %d points) -> %s",
             config.method, points[best], means[best], min(means), max(means), len(points),
             config.out)
    return result


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``select`` command."""
    p = subparsers.add_parser("select", help="per-domain hyperparameter grid search on the "
                              "validation episodes")
    p.add_argument("--method", choices=sorted(m for m, keys in TUNED.items() if keys),
                   required=True)
    p.add_argument("--model", type=Path, required=True, help="pm model.pt (pmf) or pool.pt")
    p.add_argument("--backbone-checkpoint", type=Path, help="override the recorded backbone file")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--episodes", type=Path, required=True, help="the validation episodes")
    p.add_argument("--grid", type=_grid_json, required=True,
                   help='JSON, e.g. {"beta": [1, 2], "str": ["none", {"layers": "fc1", '
                        '"ratio": 0.5}]}')
    p.add_argument("--selection", type=Path, dest="base_selection",
                   help="amt_ft: the amt selection holding the merge hyperparameters")
    for option in ("--ft-steps", "--seed", "--image-size", "--resize", "--workers"):
        p.add_argument(option, type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_select)


def _grid_json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--grid: not JSON: {err}") from err


def cmd_select(args: argparse.Namespace) -> int:
    keys = ("base_selection", "backbone_checkpoint", "ft_steps", "seed", "image_size", "resize",
            "workers")
    select(SelectConfig(method=args.method, model=args.model, store=args.store,
                        episodes=args.episodes, grid=args.grid, out=args.out,
                        device=args.device, amp=args.amp,
                        **{k: getattr(args, k) for k in keys if getattr(args, k) is not None}))
    return 0
