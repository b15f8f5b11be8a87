"""What an evaluation measures on one adapted episode: its conditions and their accuracy.

Conditions (one row per episode each): clean (attack none); every (attack, norm, eps) of the
attacks (pgd: ``amt.attacks.pgd_until_fooled``, step size ``alpha`` or 2.5 eps / steps, a query
counting as broken as soon as one iterate fools the model; apgd_ce, apgd_t: torchattacks' APGD /
APGDT); uniform noise U(-eps, eps) at every l_inf budget of the attacks (attack 'noise'); common
corruptions of the queries (attack = the corruption, norm 'corruption', eps = severity).
Randomness comes from generators fixed by (seed, episode, condition): results do not depend on
which other conditions run.

Loss: cross-entropy of the adapted logits (PGD, APGD-CE) or the targeted DLR loss (APGD-T, over
the min(9, N - 1) most likely wrong classes, n_classes = N). autoattack: torchattacks'
AutoAttack (standard) taken apart, each of APGD-CE, APGD-T, FAB-T and Square run on every query
(``_autoattack``): robust only if all four fail. A query counts as robust only if it
is classified correctly after every restart; a query the clean model misclassifies is not robust
(it is not attacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amt.attacks import pgd_until_fooled
from amt.corruptions import corrupt
from amt.devices import torch_generator
from amt.episodes import episode_rng
from amt.specs import AttackSpec, CorruptionSpec

APGD_T_MIN_WAYS = 4  # torchattacks' targeted DLR reads the 4th largest logit
TORCHATTACKS_HINT = "python -m pip install --no-deps torchattacks==3.5.1"


@dataclass(frozen=True)
class Condition:
    attack: str
    norm: str
    eps: float
    spec: AttackSpec | None = None  # for adversarial conditions

    @property
    def key(self) -> str:
        return f"{self.attack}:{self.norm}:{self.eps!r}"


CLEAN = Condition("none", "none", 0.0)


def build_conditions(attacks: tuple[AttackSpec, ...], corruptions: CorruptionSpec
                     ) -> list[Condition]:
    """Clean first, then the attacks, noise at each l_inf budget, the corruptions."""
    found = [CLEAN] + [Condition(s.attack, s.norm, e, s) for s in attacks for e in s.eps]
    linf = sorted({c.eps for c in found if c.norm == "linf"})
    found += [Condition("noise", "linf", e) for e in linf]
    found += [Condition(n, "corruption", float(s)) for n in corruptions.names
              for s in corruptions.severities]
    keys = [c.key for c in found]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"conditions listed more than once: {twice}")
    return found


def _predict(classifier: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return classifier(x).argmax(-1)


def robust_correct(classifier: nn.Module, xq: Tensor, yq: Tensor, spec: AttackSpec, eps: float,
                   correct: Tensor, seed: int, *keys: int | str) -> Tensor:
    """Which queries survive ``spec`` at ``eps`` (every restart); ``correct``: clean verdicts.
    The N of an N-way episode is the number of logits, ``correct`` is a bool per query."""
    correct = correct.clone()
    alive = correct.nonzero().flatten()
    if len(alive) == 0:
        return correct
    x, y = xq[alive], yq[alive]
    if spec.attack == "pgd":
        generator = torch_generator(seed, *keys, device=xq.device)
        for _ in range(spec.restarts):  # each restart attacks the queries still standing
            _, fooled = pgd_until_fooled(classifier, x, y, eps, spec.step_size(eps), spec.steps,
                                         spec.norm, spec.random_start, generator)
            kept = ~fooled
            alive, x, y = alive[kept], x[kept], y[kept]
            if len(alive) == 0:
                break
    else:
        ways = int(yq.max()) + 1  # every class of an episode has queries
        attack = torchattack(classifier, spec, eps, int(episode_rng(seed, *keys).integers(2**31)),
                             ways)
        kept = _predict(classifier, attack(x, y)) == y
        alive = alive[kept]
    correct[:] = False
    correct[alive] = True
    return correct


def _apgd_ce(torchattacks, classifier: nn.Module, spec: AttackSpec, eps: float, seed: int,
             ways: int):
    return torchattacks.APGD(classifier, norm=_NORMS[spec.norm], eps=eps, steps=spec.steps,
                             n_restarts=spec.restarts, seed=seed, loss="ce")


def _apgd_t(torchattacks, classifier: nn.Module, spec: AttackSpec, eps: float, seed: int,
            ways: int):
    if ways < APGD_T_MIN_WAYS:
        raise ValueError(f"apgd_t: a {ways}-way episode; torchattacks' targeted DLR loss needs "
                         f"at least {APGD_T_MIN_WAYS} classes")
    attack = torchattacks.APGDT(classifier, norm=_NORMS[spec.norm], eps=eps, steps=spec.steps,
                                n_restarts=spec.restarts, seed=seed, n_classes=ways)
    attack.n_target_classes = min(9, ways - 1)
    return attack


class WorstCase:
    """Several attacks, each run on every query it is given: a query's adversarial is the
    first attack's that fools the classifier, else the query itself. So a query survives only
    if every attack fails on it, and the accuracy is at most each attack's alone."""

    def __init__(self, classifier: nn.Module, attacks: list) -> None:
        self.classifier, self.attacks = classifier, attacks

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        adversarial, standing = x.clone(), torch.ones_like(y, dtype=torch.bool)
        for attack in self.attacks:
            candidate = attack(x, y)
            fooled = _predict(self.classifier, candidate) != y
            adversarial[fooled & standing] = candidate[fooled & standing]
            standing &= ~fooled
        return adversarial


def _autoattack(torchattacks, classifier: nn.Module, spec: AttackSpec, eps: float, seed: int,
                ways: int) -> WorstCase:
    """torchattacks' AutoAttack(version='standard') composition (APGD-CE, APGD-T, FAB-T,
    Square, one seed), with ``spec.steps`` iterations of APGD-CE, APGD-T and FAB-T (the
    original's 100; torchattacks leaves its default 10), ``spec.queries`` of Square,
    ``spec.restarts`` each, min(9, N - 1) target classes (the original's 9). Unlike its
    MultiAttack, which attacks only the queries the earlier attacks left standing, every
    attack runs on every query: the same run as the attack alone, so the worst case per query
    is at most each attack's accuracy on every episode (at the cost of attacking queries
    already broken)."""
    if ways < APGD_T_MIN_WAYS:
        raise ValueError(f"autoattack: a {ways}-way episode; its APGD-T needs at least "
                         f"{APGD_T_MIN_WAYS} classes")
    attacks = torchattacks.AutoAttack(classifier, norm=_NORMS[spec.norm], eps=eps,
                                      version="standard", n_classes=ways,
                                      seed=seed)._autoattack.attacks
    for attack in attacks:
        attack.n_restarts = spec.restarts
        if hasattr(attack, "n_target_classes"):  # APGD-T, FAB-T
            attack.n_target_classes = min(9, ways - 1)
        if hasattr(attack, "n_queries"):  # Square
            attack.n_queries = spec.queries
        else:
            attack.steps = spec.steps
    return WorstCase(classifier, attacks)


_NORMS = {"linf": "Linf", "l2": "L2"}  # torchattacks' names
# The registry's attacks that torchattacks runs (pgd is amt.attacks'): name -> its builder.
TORCHATTACKS = {"apgd_ce": _apgd_ce, "apgd_t": _apgd_t, "autoattack": _autoattack}


def torchattack(classifier: nn.Module, spec: AttackSpec, eps: float, seed: int, ways: int):
    """torchattacks' attack ``spec.attack`` on the adapted classifier."""
    try:
        import torchattacks
    except ImportError as err:
        raise RuntimeError(f"attack {spec.attack} needs torchattacks; install it with "
                           f"`{TORCHATTACKS_HINT}` (--no-deps: it pins an old requests)") from err
    return TORCHATTACKS[spec.attack](torchattacks, classifier, spec, eps, seed, ways)


def uniform_noise(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x)
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def condition_verdicts(classifier: nn.Module, xq: Tensor, yq: Tensor, condition: Condition,
                       correct: Tensor, seed: int, index: int) -> Tensor:
    """Which queries the adapted classifier gets right under one non-clean condition."""
    keys = (index, condition.key)
    if condition.spec is not None:
        return robust_correct(classifier, xq, yq, condition.spec, condition.eps, correct, seed,
                              *keys)
    generator = torch_generator(seed, *keys)
    if condition.norm == "corruption":
        x = corrupt(xq, condition.attack, int(condition.eps), generator)
    else:
        x = uniform_noise(xq, condition.eps, generator)
    return _predict(classifier, x) == yq

