"""Clean, adversarial and corruption accuracy of one (domain, backbone, method, setting).

Threat model. The support set is clean. The model first adapts to it (prototypes; TTM's
scoring, merging and trimming; PMF's fine-tuning), and the adapted classifier is then fixed:
its prototypes are never recomputed. Only then are the queries attacked, white-box, through
the adapted classifier (the attacker knows the merged or fine-tuned weights and the
prototypes; it cannot touch the support or the adaptation). Perturbations live in [0, 1] pixel
space, normalisation being inside the model: an attacked query is x + delta in [0, 1] with
||delta||_inf <= eps or ||delta||_2 <= eps. Loss: cross-entropy of the adapted logits (PGD,
APGD-CE) or the targeted DLR loss (APGD-T, over the min(9, N - 1) most likely wrong classes,
n_classes = N). A query counts as robust only if it is classified correctly after every
restart; a query the clean model misclassifies is not robust (it is not attacked).

Conditions (one row per episode each): clean (attack none); every (attack, norm, eps) of
``--attacks`` (pgd: ``amt.attacks.pgd_until_fooled``, step size ``alpha`` or 2.5 eps / steps,
a query counting as broken as soon as one iterate fools the model; apgd_ce, apgd_t:
torchattacks' APGD / APGDT); uniform noise U(-eps, eps) at every l_inf budget of the
attacks (attack 'noise'); common corruptions of the queries (attack = the corruption, norm
'corruption', eps = severity). Randomness comes from generators fixed by (seed, episode,
condition): results do not depend on which other conditions run.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"), per job, written
to ``<out>.sanity.json``: mean accuracy non-increasing in eps for every (attack, norm);
2k PGD steps never more accurate than k (on the first ``sanity.episodes`` episodes); uniform
noise of each l_inf size costs at most half the accuracy the strongest attack of that size
costs (+ NOISE_SLACK); with ``sanity.large_eps`` configured, l_inf PGD at that budget leaves at
most NEAR_ZERO accuracy. A failed check is logged as a warning; the job still succeeds.

Outputs: the tidy CSV (``amt.report.results``; validated, written atomically), the sanity
JSON, and for methods with merged weights ``<out>.spectra.csv``: the singular values of the
first episode's final LoRA-layer weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from amt import devices
from amt.adapt import (
    MERGING,
    METHODS,
    Adapted,
    EmbeddingCache,
    FrozenMethod,
    Method,
    load_method,
    merged_spectra,
    read_selection,
    torch_generator,
)
from amt.attacks import pgd_until_fooled
from amt.checkpoints import sha256, write_json_atomic
from amt.corruptions import CORRUPTIONS, corrupt
from amt.episodes import (
    Episode,
    EpisodeDataset,
    check_episodes_fit,
    check_episodes_match,
    episode_rng,
    load_episodes,
    store_fingerprint,
)
from amt.errors import UserError
from amt.report.results import SEVERITIES, parse_spectra, validate_results
from amt.transforms import test_transform
from data_prep.store import DomainStore

log = logging.getLogger(__name__)

ATTACKS = ("pgd", "apgd_ce", "apgd_t")
NORMS = ("linf", "l2")
ALPHA_FACTOR = 2.5  # default PGD step size: 2.5 eps / steps (Madry et al. 2018)
NEAR_ZERO = 0.05  # "near 0" accuracy at the large sanity budget
NOISE_SLACK = 0.01  # accuracy noise may cost beyond half the attack's drop
APGD_T_MIN_WAYS = 4  # torchattacks' targeted DLR reads the 4th largest logit
TORCHATTACKS_HINT = "python -m pip install --no-deps torchattacks==3.5.1"


# -- configuration --------------------------------------------------------------------------------
def budget(value: object, where: str) -> float:
    """'k/255' or a number -> a float in (0, 1]: pixels live in [0, 1], so a larger budget
    (e.g. 8 meant as 8/255) allows any image."""
    try:
        eps = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise UserError(f"{where}: eps {value!r} is not a number or a fraction like '2/255' "
                        "(with a non-zero denominator)") from err
    if isinstance(value, bool) or not np.isfinite(eps) or not 0 < eps <= 1:
        raise UserError(f"{where}: eps {value!r}: expected a budget in (0, 1] (pixel space is "
                        "[0, 1]; write e.g. '8/255')")
    return eps


@dataclass(frozen=True)
class AttackSpec:
    """One attack over a list of budgets."""

    attack: str
    norm: str
    eps: tuple[float, ...]
    steps: int = 10
    restarts: int = 1
    alpha: float | None = None  # PGD step size; None -> ALPHA_FACTOR * eps / steps
    random_start: bool = True  # PGD only (APGD always starts at a random point)

    def step_size(self, eps: float) -> float:
        return ALPHA_FACTOR * eps / self.steps if self.alpha is None else self.alpha


def _spec(item: object, where: str) -> AttackSpec:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object like {{\"attack\": \"pgd\", ...}}")
    allowed = {"attack", "norm", "eps", "steps", "restarts", "alpha", "random_start"}
    unknown = sorted(set(item) - allowed)
    missing = sorted({"attack", "norm", "eps"} - set(item))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; allowed: "
                         f"{sorted(allowed)}")
    checks = {"attack": item["attack"] in ATTACKS, "norm": item["norm"] in NORMS,
              "eps": isinstance(item["eps"], list) and bool(item["eps"]),
              "steps": _int_at_least(item.get("steps", 10), 1),
              "restarts": _int_at_least(item.get("restarts", 1), 1),
              "random_start": isinstance(item.get("random_start", True), bool)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{where}: bad value of {bad[0]!r}: {item[bad[0]]!r} (attack in "
                         f"{ATTACKS}, norm in {NORMS}, eps a non-empty list, steps and "
                         "restarts ints >= 1, random_start true/false)")
    alpha = item.get("alpha")
    return AttackSpec(item["attack"], item["norm"],
                      tuple(budget(e, f"{where}.eps") for e in item["eps"]),
                      item.get("steps", 10), item.get("restarts", 1),
                      None if alpha is None else budget(alpha, f"{where}.alpha"),
                      item.get("random_start", True))


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def parse_attacks(value: object, source: str = "--attacks") -> tuple[AttackSpec, ...]:
    """A JSON list of attack objects -> specs; every problem names the item and key."""
    if not isinstance(value, list):
        raise ValueError(f"{source}: expected a JSON list of attack objects")
    return tuple(_spec(item, f"{source}[{i}]") for i, item in enumerate(value))


@dataclass(frozen=True)
class CorruptionSpec:
    names: tuple[str, ...] = ()
    severities: tuple[int, ...] = ()


def parse_corruptions(value: object, source: str = "--corruptions") -> CorruptionSpec:
    if not isinstance(value, dict) or set(value) != {"names", "severities"}:
        raise ValueError(f"{source}: expected {{\"names\": [...], \"severities\": [...]}}")
    names, severities = value["names"], value["severities"]
    unknown = [n for n in names if n not in CORRUPTIONS] if isinstance(names, list) else names
    if unknown or not isinstance(severities, list) or \
            any(s not in SEVERITIES or isinstance(s, bool) for s in severities):
        raise ValueError(f"{source}: names {names!r}, severities {severities!r}: expected names "
                         f"among {sorted(CORRUPTIONS)} and severities among {list(SEVERITIES)}")
    return CorruptionSpec(tuple(names), tuple(severities))


@dataclass(frozen=True)
class SanitySpec:
    episodes: int = 2  # episodes of the k-vs-2k-steps and large-eps checks
    large_eps: float | None = None  # an l_inf budget that should break any model, e.g. 64/255


def parse_sanity(value: object, source: str = "--sanity") -> SanitySpec:
    if not isinstance(value, dict) or not set(value) <= {"episodes", "large_eps"}:
        raise ValueError(f"{source}: expected {{\"episodes\": n, \"large_eps\": \"64/255\"}}")
    episodes = value.get("episodes", SanitySpec.episodes)
    if not _int_at_least(episodes, 0):
        raise ValueError(f"{source}: episodes={episodes!r}: expected an int >= 0")
    large = value.get("large_eps")
    return SanitySpec(episodes, None if large is None else budget(large, f"{source}.large_eps"))


@dataclass
class EvalConfig:
    """One evaluation job (the ``evaluate`` command's arguments)."""

    method: str
    model: Path
    store: Path
    episodes: Path
    benchmark: str
    domain: str
    in_domain: bool
    setting_name: str
    out: Path
    backbone_checkpoint: Path | None = None
    selection: Path | None = None
    attacks: tuple[AttackSpec, ...] = ()
    corruptions: CorruptionSpec = field(default_factory=CorruptionSpec)
    sanity: SanitySpec = field(default_factory=SanitySpec)
    seed: int = 0
    image_size: int | None = None  # None -> the model's
    resize: int | None = None  # None -> round(image_size * 146 / 128), the paper's ratio
    device: str = "auto"
    workers: int = 0
    amp: bool = True
    log_every: int = 50
    spectra_layers: tuple[str, ...] | None = None  # name suffixes; None -> every LoRA layer

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {list(METHODS)}")
        for key, low in (("seed", 0), ("workers", 0), ("log_every", 1)):
            if not _int_at_least(getattr(self, key), low):
                raise ValueError(f"{key}={getattr(self, key)!r}: expected an int >= {low}")

    @property
    def sanity_path(self) -> Path:
        return self.out.with_suffix(".sanity.json")

    @property
    def spectra_path(self) -> Path:
        return self.out.with_suffix(".spectra.csv")


# -- conditions -----------------------------------------------------------------------------------
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


def torchattack(classifier: nn.Module, spec: AttackSpec, eps: float, seed: int, ways: int):
    """torchattacks' APGD (CE) or APGDT (targeted DLR) on the adapted classifier."""
    try:
        import torchattacks
    except ImportError as err:
        raise RuntimeError(f"attack {spec.attack} needs torchattacks; install it with "
                           f"`{TORCHATTACKS_HINT}` (--no-deps: it pins an old requests)") from err
    norm = {"linf": "Linf", "l2": "L2"}[spec.norm]
    if spec.attack == "apgd_ce":
        return torchattacks.APGD(classifier, norm=norm, eps=eps, steps=spec.steps,
                                 n_restarts=spec.restarts, seed=seed, loss="ce")
    if ways < APGD_T_MIN_WAYS:
        raise ValueError(f"apgd_t: a {ways}-way episode; torchattacks' targeted DLR loss needs "
                         f"at least {APGD_T_MIN_WAYS} classes")
    attack = torchattacks.APGDT(classifier, norm=norm, eps=eps, steps=spec.steps,
                                n_restarts=spec.restarts, seed=seed, n_classes=ways)
    attack.n_target_classes = min(9, ways - 1)
    return attack


def uniform_noise(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x)
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def condition_accuracy(classifier: nn.Module, xq: Tensor, yq: Tensor, condition: Condition,
                       correct: Tensor, seed: int, index: int) -> float:
    """Accuracy of the adapted classifier on the queries under one non-clean condition."""
    keys = (index, condition.key)
    if condition.spec is not None:
        survived = robust_correct(classifier, xq, yq, condition.spec, condition.eps, correct,
                                  seed, *keys)
        return survived.float().mean().item()
    generator = torch_generator(seed, *keys)
    if condition.norm == "corruption":
        x = corrupt(xq, condition.attack, int(condition.eps), generator)
    else:
        x = uniform_noise(xq, condition.eps, generator)
    return (_predict(classifier, x) == yq).float().mean().item()


# -- the job --------------------------------------------------------------------------------------
class _Images(Dataset):
    """Distinct store images through a deterministic transform: (index, image)."""

    def __init__(self, store: DomainStore, ids: np.ndarray, transform) -> None:
        self.store, self.ids, self.transform = store, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return int(self.ids[i]), self.transform(self.store.read(int(self.ids[i]))).numpy()


def _stack(items: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, Tensor]:
    # numpy, not torch.stack: see amt.episodes.load_episode
    return np.array([i for i, _ in items]), torch.from_numpy(np.stack([x for _, x in items]))


def image_sizes(method: Method, image_size: int | None, resize: int | None, model: Path
                ) -> tuple[int, int]:
    """(image size, resize of the test transform): the model's size unless given (it must
    match), and round(size * 146 / 128) unless given."""
    model_size = method.backbone.vit.patch_embed.img_size[0]
    size = image_size or model_size
    if size != model_size:
        raise ValueError(f"--image-size {size}: the model {model} was built for {model_size} px")
    return size, resize or round(size * 146 / 128)


def episode_batches(dataset: EpisodeDataset, workers: int, device: torch.device
                    ) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """(index, (xs, ys, xq, yq) on ``device``) for every episode, loaded by ``workers``."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for index, batch in enumerate(loader):
        yield index, tuple(t.to(device, non_blocking=True) for t in batch)


class Evaluation:
    """One job: its method, episodes, conditions and what they produce."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.device = devices.pick_device(config.device)
        self.store = DomainStore(config.store)
        self.episodes, meta = load_episodes(config.episodes)
        check_episodes_match(self.store, meta)
        check_episodes_fit(self.store, self.episodes, meta, config.episodes, config.setting_name)
        self.hyper = read_selection(config.selection, config.method, config.model)
        self.method = load_method(config.method, config.model, self.hyper, self.device,
                                  config.amp, config.seed, config.backbone_checkpoint)
        self.image_size, self.resize = image_sizes(self.method, config.image_size,
                                                   config.resize, config.model)
        self.transform = test_transform(self.image_size, self.resize)
        self.dataset = EpisodeDataset(self.store, self.episodes, self.transform, config.seed)
        self.conditions = build_conditions(config.attacks, config.corruptions)
        self.config_hash = self._hash()
        self.cache: EmbeddingCache | None = None
        self.extras: list[dict] = []

    def _hash(self) -> str:
        """sha256 of every setting that changes the numbers (file contents, not paths)."""
        c = self.config
        payload = {
            "method": c.method, "model_sha256": sha256(c.model),
            "backbone_checkpoint_sha256": c.backbone_checkpoint and sha256(c.backbone_checkpoint),
            "episodes_sha256": sha256(c.episodes), "store": store_fingerprint(self.store),
            "hyperparameters": asdict(self.hyper), "attacks": [asdict(a) for a in c.attacks],
            "corruptions": asdict(c.corruptions), "seed": c.seed, "image_size": self.image_size,
            "resize": self.resize, "amp": c.amp, "device": self.device.type}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _build_cache(self) -> None:
        """A frozen backbone's clean embeddings: one pass over the images the episodes use."""
        ids = np.unique(np.concatenate([np.concatenate([e.support, e.query])
                                        for e in self.episodes]))
        loader = DataLoader(_Images(self.store, ids, self.transform), batch_size=64,
                            num_workers=self.config.workers, collate_fn=_stack,
                            pin_memory=self.device.type == "cuda")
        self.cache = EmbeddingCache.build(self.method, loader)
        log.info("embedding cache: %d distinct images for %d episodes", len(ids),
                 len(self.episodes))

    def _cached_clean(self, chunk: int = 256) -> dict[int, tuple[Tensor, Tensor]]:
        """Each episode's prototypes and clean query logits from the embedding cache, computed
        for up to ``chunk`` episodes of one shape at a time."""
        shapes: dict[tuple[int, int, int], list[int]] = {}
        for i, e in enumerate(self.episodes):
            shapes.setdefault((len(e.support), len(e.query), len(e.classes)), []).append(i)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for (n, q, ways), indices in shapes.items():
            for start in range(0, len(indices), chunk):
                part = [self.episodes[i] for i in indices[start:start + chunk]]
                ys = torch.from_numpy(np.stack([e.support_labels for e in part]))
                support = self.cache(np.concatenate([e.support for e in part]))
                queries = self.cache(np.concatenate([e.query for e in part]))
                protos, logits = self.method.cached_logits(
                    ys.to(self.device), support.view(len(part), n, -1),
                    queries.view(len(part), q, -1), ways)
                for i, p, lg in zip(indices[start:start + chunk], protos, logits, strict=True):
                    out[i] = (p, lg)
        return out

    def _data(self, pixels: bool) -> Iterator[tuple[int, tuple[Tensor, ...] | None]]:
        if pixels:
            yield from episode_batches(self.dataset, self.config.workers, self.device)
        else:
            yield from ((i, None) for i in range(len(self.episodes)))

    def run(self) -> pd.DataFrame:
        clean = None
        if isinstance(self.method, FrozenMethod):
            self._build_cache()
            clean = self._cached_clean()
        pixels = self.cache is None or len(self.conditions) > 1 or \
            self.config.sanity.large_eps is not None
        records, started = [], time.perf_counter()
        for index, data in self._data(pixels):
            results = self._episode(index, self.episodes[index], data,
                                    None if clean is None else clean[index])
            records += [(index, c, acc) for c, acc in results]
            self._progress(index, records, started)
        return self._frame(records)

    def _episode(self, index: int, episode: Episode, data: tuple[Tensor, ...] | None,
                 clean: tuple[Tensor, Tensor] | None) -> list[tuple[Condition, float]]:
        """``clean``: the episode's cached prototypes and clean logits (frozen methods)."""
        ys = torch.tensor(episode.support_labels, device=self.device)  # copies: Episode arrays
        yq = torch.tensor(episode.query_labels, device=self.device)  # are read-only
        xs, xq = (None, None) if data is None else (data[0], data[2])
        if clean is not None:
            context = nullcontext(self.method.adapted(*clean))
        else:
            context = self.method.adapt(xs, ys, index, queries=xq)
        with context as adapted:
            correct = adapted.clean_logits.argmax(-1) == yq
            results = [(CLEAN, correct.float().mean().item())]
            results += [(c, condition_accuracy(adapted.classifier, xq, yq, c, correct,
                                               self.config.seed, index))
                        for c in self.conditions[1:]]
            if index < self.config.sanity.episodes:
                self._sanity_runs(adapted, xq, yq, correct, index)
        return results

    def _sanity_runs(self, adapted: Adapted, xq: Tensor, yq: Tensor, correct: Tensor,
                     index: int) -> None:
        """The extra attacks of the sanity checks: 2k PGD steps, and the large budget."""
        seed = self.config.seed
        for c in self.conditions:
            if c.spec is not None and c.spec.attack == "pgd":
                spec = replace(c.spec, steps=2 * c.spec.steps)
                survived = robust_correct(adapted.classifier, xq, yq, spec, c.eps, correct, seed,
                                          index, c.key, "2k")
                self.extras.append({"kind": "steps", "key": c.key, "episode": index,
                                    "accuracy": survived.float().mean().item()})
        large = self.config.sanity.large_eps
        if large is not None:
            # the first l_inf PGD's steps and restarts, with a step size that scales with eps
            spec = next((replace(s, alpha=None) for s in self.config.attacks
                         if s.attack == "pgd" and s.norm == "linf"),
                        AttackSpec("pgd", "linf", (large,)))
            survived = robust_correct(adapted.classifier, xq, yq, spec, large, correct, seed,
                                      index, "large_eps")
            self.extras.append({"kind": "large_eps", "eps": large, "episode": index,
                                "accuracy": survived.float().mean().item()})

    def _progress(self, index: int, records: list, started: float) -> None:
        done = index + 1
        if done % self.config.log_every and done != len(self.episodes):
            return
        clean = np.mean([acc for _, c, acc in records if c is CLEAN])
        log.info("%s %s %s: episode %d/%d, clean accuracy %.3f, %.2f s/episode",
                 self.config.method, self.config.domain, self.config.setting_name, done,
                 len(self.episodes), clean, (time.perf_counter() - started) / done)

    def _frame(self, records: list[tuple[int, Condition, float]]) -> pd.DataFrame:
        c = self.config
        frame = pd.DataFrame(
            [{"benchmark": c.benchmark, "domain": c.domain, "in_domain": c.in_domain,
              "backbone": self.method.backbone_name, "method": c.method,
              "setting": c.setting_name, "episode": index, "attack": cond.attack,
              "norm": cond.norm, "eps": cond.eps, "accuracy": acc, "seed": c.seed,
              "config_hash": self.config_hash} for index, cond, acc in records])
        validate_results(frame, source=f"evaluation rows for {c.out}")
        return frame

    def spectra(self) -> pd.DataFrame:
        xs, ys, _, _ = (t.to(self.device) for t in self.dataset[0])
        frame = merged_spectra(self.method, xs, ys, 0, self.config.domain, self.config.method,
                               self.config.spectra_layers)
        return parse_spectra(frame.astype(str), f"spectra of {self.config.out}")

    def sanity(self, frame: pd.DataFrame, seconds: float) -> dict:
        checks = sanity_checks(frame, self.extras, self.conditions, self.config.sanity)
        failed = [c["check"] for c in checks if not c["ok"]]
        for name in failed:
            log.warning("sanity check failed: %s (see %s)", name, self.config.sanity_path)
        return {"config_hash": self.config_hash, "method": self.config.method,
                "backbone": self.method.backbone_name, "domain": self.config.domain,
                "setting": self.config.setting_name,
                "episodes": len(self.episodes), "hyperparameters": asdict(self.hyper),
                "device": devices.describe(self.device), "seconds": round(seconds, 2),
                "peak_memory": devices.peak_memory(self.device), "all_ok": not failed,
                "checks": checks}


# -- sanity checks --------------------------------------------------------------------------------
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
    return checks


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


# -- entry points ---------------------------------------------------------------------------------
def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate(config: EvalConfig) -> pd.DataFrame:
    """Run the job and write its rows (``config.out``), sanity JSON and, for methods with
    merged weights, spectra; returns the validated rows."""
    started = time.perf_counter()
    job = Evaluation(config)
    devices.reset_peak_memory(job.device)
    frame = job.run()
    write_csv_atomic(frame, config.out)
    if config.method in MERGING:
        write_csv_atomic(job.spectra(), config.spectra_path)
    write_json_atomic(job.sanity(frame, time.perf_counter() - started), config.sanity_path)
    log.info("%d rows -> %s", len(frame), config.out)
    return frame


def _json_option(parse):
    def read(text: str):
        try:
            return parse(json.loads(text))
        except (json.JSONDecodeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return read


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    p = subparsers.add_parser("evaluate", help="clean/adversarial/corruption accuracy of one "
                              "(domain, backbone, method, setting)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--model", type=Path, required=True,
                   help="pm/lora model.pt (pm, pmf, lora) or pool.pt (the amt family)")
    p.add_argument("--backbone-checkpoint", type=Path, help="override the recorded backbone file")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--episodes", type=Path, required=True, help="the stored test episodes")
    p.add_argument("--selection", type=Path, help="JSON from `select` (methods with "
                   "hyperparameters)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--in-domain", action=argparse.BooleanOptionalAction, required=True)
    p.add_argument("--setting-name", required=True)
    p.add_argument("--attacks", type=_json_option(parse_attacks), default=(),
                   help='JSON list, e.g. [{"attack": "pgd", "norm": "linf", "eps": ["2/255"], '
                        '"steps": 10, "restarts": 1}]')
    p.add_argument("--corruptions", type=_json_option(parse_corruptions),
                   default=CorruptionSpec(), help='JSON {"names": [...], "severities": [...]}')
    p.add_argument("--sanity", type=_json_option(parse_sanity), default=SanitySpec(),
                   help='JSON {"episodes": 2, "large_eps": "64/255"}')
    for option, kind in (("--seed", int), ("--image-size", int), ("--resize", int),
                         ("--workers", int), ("--log-every", int)):
        p.add_argument(option, type=kind)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--spectra-layers", nargs="+", help="LoRA layer name suffixes for the "
                   "spectra (default: every layer)")
    p.add_argument("--out", type=Path, required=True, help="results CSV; the sanity JSON and "
                   "spectra CSV go beside it")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    optional = {k: getattr(args, k) for k in ("seed", "image_size", "resize", "workers",
                                              "log_every") if getattr(args, k) is not None}
    layers = tuple(args.spectra_layers) if args.spectra_layers else None
    evaluate(EvalConfig(
        method=args.method, model=args.model, store=args.store, episodes=args.episodes,
        benchmark=args.benchmark, domain=args.domain, in_domain=args.in_domain,
        setting_name=args.setting_name, out=args.out,
        backbone_checkpoint=args.backbone_checkpoint, selection=args.selection,
        attacks=tuple(args.attacks), corruptions=args.corruptions, sanity=args.sanity,
        device=args.device, amp=args.amp, spectra_layers=layers, **optional))
    return 0
