"""Per-domain hyperparameter selection: a grid search on the validation episodes.

``python -m amt select --method amt --model pool.pt --store D.h5 --episodes valid_5w1s.json
--grid '{"beta": [1, 0.5, 2], "gamma": [0.6, 0.4, 0.8], "top_k": [2, 1],
"str": ["none", {"layers": "fc1", "ratio": 0.5}]}' --out selection.json``

Grid keys: ``beta``, ``gamma``, ``top_k``, ``str`` (each value ``"none"`` or
``{"layers": "fc1" | "all", "ratio": rho}``) and ``lr`` (test-time fine-tuning; 0 = none); a
method may only use the keys it has (its registry entry's ``tuned``). amt_ft takes its merging
hyperparameters from an amt selection (``--selection``) and selects ``lr``. A grid object is one
stage: every point of its Cartesian product (in the order given); a list of grid objects is
searched stage after stage, each stage at the best point of those before, as the release
searches (beta and gamma, then STr, then lr: ``[{"beta": [...], "gamma": [...]},
{"str": [...]}]``). A point scores the mean clean accuracy over the validation episodes; the
best wins and ties go to the earliest point, so list the defaults first. The JSON keeps every
point's mean and per-episode accuracies: how flat the grid is shows there.

Cheap: TTM's member scores do not depend on beta, gamma, top_k or STr, so they are computed once
per episode (the P members side by side); a point then costs a merge (+ STr) and one forward of
support and queries, and points giving the same merge (e.g. every beta at top_k 1) share one
evaluation. With stages, the member scores are kept from the first stage for the next.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from torch import Tensor

from amt import devices
from amt.checkpoints import sha256, write_json_atomic
from amt.jobs import load_episode_job
from amt.methods import FineTuned, Method, PoolMethod
from amt.registry import (
    METHODS,
    SCORE_PRECISIONS,
    STR_SOLVERS,
    TEST_TRANSFORMS,
    method_entry,
)
from amt.selections import SELECTION_FORMAT, load_selection
from amt.specs import Hyper, SelectConfig, add_spec_argument, grid_stages, spec_from_args

log = logging.getLogger(__name__)


def _base(config: SelectConfig, stages: list[list[dict]]) -> tuple[Hyper, list[str]]:
    """The fixed hyperparameters and the full list of selected ones; raises if the method
    uses one that neither the grid nor the base selection sets."""
    base, selected = (load_selection(config.base_selection, config.model)
                      if config.base_selection else (Hyper(), []))
    base = replace(base, **config.fixed)
    chosen = sorted(set(selected).union(*(stage[0] for stage in stages)))
    missing = [k for k in method_entry(config.method).tuned if k not in chosen]
    if missing:
        raise ValueError(f"method {config.method} uses {missing} but neither --grid nor "
                         f"--selection {config.base_selection} sets them (a one-value list "
                         "fixes a value)")
    return base, chosen


def _pool_method(method: Method) -> PoolMethod | None:
    inner = method.base if isinstance(method, FineTuned) else method
    return inner if isinstance(inner, PoolMethod) else None


def score_grid(method: Method, points: list[dict], base: Hyper,
               batches: Iterable[tuple[int, tuple[Tensor, ...]]],
               member_scores: dict[int, Tensor] | None = None) -> list[list[float]]:
    """Per point, the clean accuracy on each validation episode. ``member_scores``: TTM's
    scores by episode, filled on first use (they depend on the episode only)."""
    pool = _pool_method(method)
    scoring = pool is not None and pool.entry.combine == "ttm"
    member_scores = {} if member_scores is None else member_scores
    accuracies: list[list[float]] = [[] for _ in points]
    for index, (xs, ys, xq, yq) in batches:
        if scoring and index not in member_scores:  # once per episode
            member_scores[index] = pool.scores(xs, ys, index)
        scores = member_scores.get(index)
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


def search(method: Method, stages: list[list[dict]], base: Hyper,
           batches: Callable[[], Iterable[tuple[int, tuple[Tensor, ...]]]]
           ) -> tuple[dict, list[dict]]:
    """The best point (every stage's keys) and every evaluated point's record; stage s runs
    at the best point of stages < s. ``batches`` loads the validation episodes (per stage)."""
    best_point: dict = {}
    records: list[dict] = []
    member_scores: dict[int, Tensor] = {}
    for number, points in enumerate(stages):
        at = replace(base, **best_point)
        accuracies = score_grid(method, points, at, batches(), member_scores)
        means = [float(np.mean(a)) for a in accuracies]
        best = int(np.argmax(means))  # the first of equal maxima
        best_point = {**best_point, **points[best]}
        records += [{"stage": number, "point": p, "accuracy": m, "episode_accuracy": a}
                    for p, m, a in zip(points, means, accuracies, strict=True)]
        log.info("stage %d: chose %s (accuracy %.4f; range %.4f-%.4f over %d points)", number,
                 points[best], means[best], min(means), max(means), len(points))
    return best_point, records


def select(config: SelectConfig) -> dict:
    """Grid-search the validation episodes and write the choice with every point's scores."""
    started = time.perf_counter()
    stages = grid_stages(config.grid, config.method)
    base, selected = _base(config, stages)
    job = load_episode_job(
        config.method, config.model, config.store, config.episodes, base, seed=config.seed,
        device=config.device, amp=config.amp, backbone_checkpoint=config.backbone_checkpoint,
        image_size=config.image_size, resize=config.resize,
        test_transform=config.test_transform)
    best_point, records = search(job.method, stages, base, lambda: job.batches(config.workers))
    final = [r for r in records if r["stage"] == len(stages) - 1]
    result = {
        "format": SELECTION_FORMAT, "method": config.method, "selected": selected,
        "hyperparameters": asdict(replace(base, **best_point)), "best_point": best_point,
        "best_accuracy": max(r["accuracy"] for r in final), "grid": config.grid,
        "points": records,
        "episodes": str(config.episodes), "episodes_sha256": sha256(config.episodes),
        "validation_episodes": len(job.episodes), "model": str(config.model),
        "model_sha256": sha256(config.model),
        "base_selection": config.base_selection and str(config.base_selection),
        "seed": config.seed, "image_size": job.image_size, "resize": job.resize,
        "test_transform": config.test_transform,
        "device": devices.describe(job.device), "seconds": round(time.perf_counter() - started, 2)}
    write_json_atomic(result, config.out)
    log.info("%s: chose %s (accuracy %.4f over %d points) -> %s", config.method, best_point,
             result["best_accuracy"], len(records), config.out)
    return result


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``select`` command."""
    p = subparsers.add_parser("select", help="per-domain hyperparameter grid search on the "
                              "validation episodes")
    add_spec_argument(p, SelectConfig)
    p.add_argument("--method", choices=sorted(m for m, e in METHODS.items() if e.tuned))
    p.add_argument("--model", type=Path, help="pm model.pt (pmf) or pool.pt")
    p.add_argument("--backbone-checkpoint", type=Path, help="override the recorded backbone file")
    p.add_argument("--store", type=Path)
    p.add_argument("--episodes", type=Path, help="the validation episodes")
    p.add_argument("--grid", type=json.loads,
                   help='JSON, e.g. {"beta": [1, 2], "str": ["none", {"layers": "fc1", '
                        '"ratio": 0.5}]}')
    p.add_argument("--selection", type=Path, dest="base_selection",
                   help="amt_ft: the amt selection holding the merge hyperparameters")
    for option in ("--ft-steps", "--seed", "--image-size", "--resize", "--workers"):
        p.add_argument(option, type=int)
    p.add_argument("--str-solver", choices=STR_SOLVERS)
    p.add_argument("--score-precision", choices=SCORE_PRECISIONS)
    p.add_argument("--test-transform", choices=TEST_TRANSFORMS)
    p.add_argument("--device")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    select(spec_from_args(SelectConfig, args))
    return 0
