"""Sanity checks of one evaluation job (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"), written to ``<out>.sanity.json``: mean accuracy non-increasing in eps for every
(attack, norm); 2k PGD steps never more accurate than k (on the first ``sanity.episodes``
episodes); uniform noise of each l_inf size costs at most half the accuracy the strongest attack
of that size costs (+ NOISE_SLACK); with ``sanity.large_eps`` configured, l_inf PGD at that
budget leaves at most NEAR_ZERO accuracy; the headline attack (the job's first adversarial
condition: ``evaluate.attacks[0]`` at its first budget) is within HEADLINE_GAP of the strongest
attack run on the same episodes, the worst case per query over every attack the job runs at the
headline's (norm, eps): e.g. PGD, APGD-CE and APGD-T, or autoattack (issue 15; checked only
where another attack runs at that budget). A failed check is logged as a warning; the job still
succeeds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from amt.conditions import Condition, robust_correct
from amt.registry import NORMS
from amt.specs import AttackSpec, SanitySpec

NEAR_ZERO = 0.05  # "near 0" accuracy at the large sanity budget
NOISE_SLACK = 0.01  # accuracy noise may cost beyond half the attack's drop
HEADLINE_GAP = 0.01  # the headline attack may leave 1 point more accuracy than the worst case


def sanity_runs(classifier: nn.Module, xq: Tensor, yq: Tensor, correct: Tensor, index: int,
                conditions: list[Condition], attacks: tuple[AttackSpec, ...], spec: SanitySpec,
                seed: int) -> list[dict]:
    """The extra attacks of the checks on one episode: 2k PGD steps, and the large budget."""
    extras = []
    for c in conditions:
        if c.spec is not None and c.spec.attack == "pgd":
            doubled = replace(c.spec, steps=2 * c.spec.steps)
            survived = robust_correct(classifier, xq, yq, doubled, c.eps, correct, seed, index,
                                      c.key, "2k")
            extras.append({"kind": "steps", "key": c.key, "episode": index,
                           "accuracy": survived.float().mean().item()})
    if spec.large_eps is not None:
        # the first l_inf PGD's steps and restarts, with a step size that scales with eps
        pgd = next((replace(s, alpha=None) for s in attacks
                    if s.attack == "pgd" and s.norm == "linf"),
                   AttackSpec("pgd", "linf", (spec.large_eps,)))
        survived = robust_correct(classifier, xq, yq, pgd, spec.large_eps, correct, seed, index,
                                  "large_eps")
        extras.append({"kind": "large_eps", "eps": spec.large_eps, "episode": index,
                       "accuracy": survived.float().mean().item()})
    return extras


def worst_case_runs(verdicts: dict[Condition, Tensor], index: int) -> list[dict]:
    """Per (norm, eps) with two or more attacks: the accuracy of one episode when a query counts
    as robust only if it survives every attack at that budget (``verdicts``: per query)."""
    budgets: dict[tuple[str, float], list[Condition]] = {}
    for c in verdicts:
        if c.spec is not None:
            budgets.setdefault((c.norm, c.eps), []).append(c)
    extras = []
    for (norm, eps), found in budgets.items():
        if len(found) > 1:
            robust = torch.stack([verdicts[c] for c in found]).all(0)
            extras.append({"kind": "worst", "norm": norm, "eps": eps, "episode": index,
                           "attacks": [c.attack for c in found],
                           "accuracy": robust.float().mean().item()})
    return extras


def sanity_checks(frame: pd.DataFrame, extras: list[dict], conditions: list[Condition],
                  spec: SanitySpec) -> list[dict]:
    mean = frame.groupby(["attack", "norm", "eps"])["accuracy"].mean()
    clean = float(mean[("none", "none", 0.0)])
    checks = _monotone(mean, clean) + _noise(mean, clean)
    by_key = {c.key: c for c in conditions}
    for key in dict.fromkeys(e["key"] for e in extras if e["kind"] == "steps"):
        c = by_key[key]
        runs = [e for e in extras if e.get("key") == key]
        episodes = [e["episode"] for e in runs]
        rows = frame[(frame.attack == c.attack) & (frame.norm == c.norm) & (frame.eps == c.eps)
                     & frame.episode.isin(episodes)]
        k, k2 = float(rows.accuracy.mean()), float(np.mean([e["accuracy"] for e in runs]))
        checks.append({"check": f"{c.spec.steps} vs {2 * c.spec.steps} steps {key}",
                       "episodes": episodes, "accuracy_k": k, "accuracy_2k": k2,
                       "ok": k2 <= k + 1e-9})
    large = [e for e in extras if e["kind"] == "large_eps"]
    if large:
        accuracy = float(np.mean([e["accuracy"] for e in large]))
        checks.append({"check": f"l_inf PGD at eps {spec.large_eps:.5g} reaches ~0",
                       "episodes": [e["episode"] for e in large], "accuracy": accuracy,
                       "ok": accuracy <= NEAR_ZERO})
    return checks + _headline(frame, extras, conditions)


def _headline(frame: pd.DataFrame, extras: list[dict], conditions: list[Condition]
              ) -> list[dict]:
    """The headline attack against the worst case over every attack at its budget."""
    headline = next((c for c in conditions if c.spec is not None), None)
    worst = [e for e in extras if e["kind"] == "worst" and headline is not None
             and (e["norm"], e["eps"]) == (headline.norm, headline.eps)]
    if not worst:
        return []
    rows = frame[(frame.attack == headline.attack) & (frame.norm == headline.norm)
                 & (frame.eps == headline.eps)]
    accuracy = float(rows.accuracy.mean())
    strongest = float(np.mean([e["accuracy"] for e in worst]))
    over = "+".join(worst[0]["attacks"])
    name = f"{headline.attack} {headline.norm} eps {headline.eps:.5g}"
    return [{"check": f"headline {name} within {100 * HEADLINE_GAP:g} point of the worst case "
                      f"over {over}",
             "episodes": len(worst), "headline": name, "accuracy": accuracy,
             "strongest": f"worst case over {over}", "strongest_accuracy": strongest,
             "ok": accuracy - strongest <= HEADLINE_GAP + 1e-9}]


def _monotone(mean: pd.Series, clean: float) -> list[dict]:
    checks = []
    for (attack, norm), curve in mean.groupby(level=["attack", "norm"]):
        if norm not in NORMS or attack == "noise":
            continue
        curve = curve.sort_index(level="eps")
        values = [clean, *curve.tolist()]
        budgets = [0.0, *curve.index.get_level_values("eps").tolist()]
        checks.append({"check": f"{attack} {norm}: accuracy non-increasing in eps",
                       "eps": budgets, "accuracy": values,
                       "ok": bool(np.all(np.diff(values) <= 1e-9))})
    return checks


def _noise(mean: pd.Series, clean: float) -> list[dict]:
    checks = []
    for (attack, norm, eps), noise in mean.items():
        if attack != "noise":
            continue
        attacked = mean[(mean.index.get_level_values("norm") == norm) &
                        (mean.index.get_level_values("eps") == eps) &
                        (mean.index.get_level_values("attack") != "noise")]
        strongest = float(attacked.min())
        checks.append({"check": f"uniform noise at l_inf {eps:.5g} hurts far less than the "
                                "attack", "clean": clean, "noise": float(noise),
                       "attack": strongest,
                       "ok": clean - noise <= 0.5 * (clean - strongest) + NOISE_SLACK})
    return checks
