"""Labels and condition helpers of the report over tidy results (format: ``amt.rows``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from amt.registry import METHODS
from amt.rows import CONDITION

METHOD_LABELS: dict[str, str] = {name: entry.label for name, entry in METHODS.items()}
ATTACK_LABELS: dict[str, str] = {"pgd": "PGD", "apgd_ce": "APGD-CE", "apgd_t": "APGD-T",
                                 "autoattack": "AutoAttack", "noise": "random noise"}
NORM_LABELS: dict[str, str] = {"linf": "ℓ∞", "l2": "ℓ2"}


# -- conditions and labels ------------------------------------------------------------------------
def condition_kind(norm: str) -> str:
    """clean, adversarial or corruption."""
    return {"none": "clean", "corruption": "corruption"}.get(norm, "adversarial")


def format_eps(norm: str, eps: float) -> str:
    """ℓ∞ budgets as k/255 when they are (within rounding), others as a short decimal."""
    if norm == "linf" and math.isclose(eps * 255, round(eps * 255), abs_tol=1e-6):
        return f"{round(eps * 255)}/255"
    if norm == "corruption":
        return str(int(eps))
    return f"{eps:g}"


def condition_label(attack: str, norm: str, eps: float) -> str:
    """Human-readable condition, e.g. 'PGD ℓ∞ ε=2/255', 'gaussian noise s3', 'clean'."""
    kind = condition_kind(norm)
    if kind == "clean":
        return "clean"
    if kind == "corruption":
        return f"{attack.replace('_', ' ')} s{format_eps(norm, eps)}"
    return (f"{ATTACK_LABELS.get(attack, attack)} {NORM_LABELS.get(norm, norm)} "
            f"ε={format_eps(norm, eps)}")


def condition_slug(attack: str, norm: str, eps: float) -> str:
    """File-name form of a condition, e.g. 'pgd_linf_2-255', 'clean'."""
    if condition_kind(norm) == "clean":
        return "clean"
    return f"{attack}_{norm}_{format_eps(norm, eps).replace('/', '-')}"


def method_label(method: str) -> str:
    """The registry's label; a sweep's generated method its own (AMT (λ_adv = 3))."""
    return METHODS[method].label if method in METHODS else method


def conditions(frame: pd.DataFrame, kinds: Sequence[str]) -> list[tuple[str, str, float]]:
    """The (attack, norm, eps) present in ``frame`` of the given kinds, clean first, then sorted."""
    found = frame[list(CONDITION)].drop_duplicates().itertuples(index=False, name=None)
    chosen = [c for c in found if condition_kind(c[1]) in kinds]
    order = {"clean": 0, "adversarial": 1, "corruption": 2}
    return sorted(chosen, key=lambda c: (order[condition_kind(c[1])], c[0], c[1], c[2]))


def select_condition(frame: pd.DataFrame, condition: tuple[str, str, float]) -> pd.DataFrame:
    attack, norm, eps = condition
    return frame[(frame.attack == attack) & (frame.norm == norm) & (frame.eps == eps)]
