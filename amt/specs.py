"""Every job's specification: one dataclass per command, free of torch.

The workflow plan (``amt.plan``) builds one spec per job from the config; the rule hands it to
the command as JSON (``--spec``), and single flags override its fields when a command is run by
hand. The same dataclasses check their values when the plan builds them, so whatever a job
would reject stops ``snakemake -n``. Each default lives here, once.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from amt.errors import UserError
from amt.registry import (
    APSV_LOSS_SUPPORT,
    APSV_RESCALE,
    APSV_SPACES,
    ATTACKS,
    AVERAGE_CIS,
    CORRUPTIONS,
    EPISODE_KINDS,
    KEEP,
    KL_DIRECTIONS,
    LORA_INITS,
    LORA_TARGETS,
    NORMS,
    OPTIMIZERS,
    POOL_STRATEGIES,
    POS_EMBEDS,
    SCHEDULES,
    SCORE_PRECISIONS,
    SEVERITIES,
    STR_LAYERS,
    STR_SOLVERS,
    TEST_TRANSFORMS,
    TRAINERS,
    backbone_entry,
    method_entry,
    parse_budget,
)

Spec = TypeVar("Spec")


# -- checks shared by the specs -------------------------------------------------------------------
def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: object, low: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value) and value >= low


def _expect(spec: object, ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise UserError(f"{key}={getattr(spec, key)!r}: expected {expected}")


def _ints(spec: object, low: int, *keys: str) -> None:
    for key in keys:
        _expect(spec, _is_int(getattr(spec, key), low), key, f"an int >= {low}")


def _numbers(spec: object, low: float, *keys: str) -> None:
    for key in keys:
        _expect(spec, _is_number(getattr(spec, key), low), key, f"a number >= {low}")


def _choice(spec: object, key: str, allowed: tuple | list | dict) -> None:
    _expect(spec, getattr(spec, key) in allowed, key, f"one of {list(allowed)}")


def _optional_path(value: object) -> Path | None:
    return None if value is None else Path(value)


# -- threat model ---------------------------------------------------------------------------------
ALPHA_FACTOR = 2.5  # default PGD step size: 2.5 eps / steps (Madry et al. 2018)
SQUARE_QUERIES = 5000  # AutoAttack standard's Square (Croce & Hein 2020; torchattacks' too)


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
    queries: int = SQUARE_QUERIES  # autoattack only: Square's query budget per restart

    def __post_init__(self) -> None:
        _choice(self, "attack", ATTACKS)
        _choice(self, "norm", NORMS)
        if not isinstance(self.eps, list | tuple) or not self.eps:
            raise UserError(f"eps={self.eps!r}: expected a non-empty list of budgets")
        object.__setattr__(self, "eps", tuple(parse_budget(e, "eps") for e in self.eps))
        _ints(self, 1, "steps", "restarts", "queries")
        _expect(self, self.attack == "autoattack" or self.queries == SQUARE_QUERIES, "queries",
                "left out: only autoattack runs Square")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", parse_budget(self.alpha, "alpha"))
        _expect(self, isinstance(self.random_start, bool), "random_start", "true or false")

    def step_size(self, eps: float) -> float:
        return ALPHA_FACTOR * eps / self.steps if self.alpha is None else self.alpha


@dataclass(frozen=True)
class CorruptionSpec:
    names: tuple[str, ...] = ()
    severities: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "severities", tuple(self.severities))
        unknown = [n for n in self.names if n not in CORRUPTIONS]
        if unknown:
            raise UserError(f"names {unknown}: expected corruptions among {list(CORRUPTIONS)}")
        bad = [s for s in self.severities if isinstance(s, bool) or s not in SEVERITIES]
        if bad:
            raise UserError(f"severities {bad}: expected severities among {list(SEVERITIES)}")


@dataclass(frozen=True)
class SanitySpec:
    episodes: int = 2  # episodes of the k-vs-2k-steps and large-eps checks
    large_eps: float | None = None  # an l_inf budget that should break any model, e.g. 64/255

    def __post_init__(self) -> None:
        _ints(self, 0, "episodes")
        if self.large_eps is not None:
            object.__setattr__(self, "large_eps", parse_budget(self.large_eps, "large_eps"))


def parse_attacks(value: object, where: str = "--attacks") -> tuple[AttackSpec, ...]:
    """A list of attack objects -> specs; every problem names the item and key."""
    if not isinstance(value, list | tuple):
        raise UserError(f"{where}: expected a list of attack objects")
    return tuple(item if isinstance(item, AttackSpec) else build(AttackSpec, item, f"{where}[{i}]")
                 for i, item in enumerate(value))


# -- test-time hyperparameters --------------------------------------------------------------------
@dataclass(frozen=True)
class Hyper:
    """Test-time hyperparameters (defaults: docs/method.md); selected per domain."""

    beta: float = 1.0
    gamma: float = 0.6
    top_k: int = 2
    str_layers: str = "none"  # a key of registry.STR_LAYERS
    str_ratio: float = 1.0  # rho
    lr: float = 0.0  # test-time fine-tuning (pmf, amt_ft); 0 = none
    # amt_linear's classifier over the members' logits: Adam steps and rate, support copies
    linear_steps: int = 100
    linear_lr: float = 0.01
    linear_copies: int = 4
    # Fixed, not selected (set by the config's evaluate section, recorded with the selection):
    ft_steps: int = 50
    # Adv. TTF (pmf_adv, amt_ft_adv): l_inf PGD on the fine-tuning's support copies, step eps/4
    ft_eps: float = 4 / 255
    ft_attack_steps: int = 3
    str_solver: str = "exact"  # a registry.STR_SOLVERS name
    score_precision: str = "fp32"  # TTM's member scoring: a registry.SCORE_PRECISIONS name

    def __post_init__(self) -> None:
        _numbers(self, 0, "beta", "lr", "linear_lr")
        _expect(self, _is_number(self.gamma, 0) and self.gamma <= 1, "gamma", "a number in [0, 1]")
        _ints(self, 1, "top_k", "linear_copies")
        _ints(self, 0, "ft_steps", "linear_steps")
        _ints(self, 1, "ft_attack_steps")
        object.__setattr__(self, "ft_eps", parse_budget(self.ft_eps, "ft_eps"))
        _choice(self, "str_layers", STR_LAYERS)
        _choice(self, "str_solver", STR_SOLVERS)
        _choice(self, "score_precision", SCORE_PRECISIONS)
        _expect(self, _is_number(self.str_ratio, 0) and 0 < self.str_ratio <= 1, "str_ratio",
                "a number in (0, 1]")

    @property
    def trims(self) -> bool:
        return self.str_layers != "none" and self.str_ratio < 1


GRID_KEYS = {"beta": ("beta",), "gamma": ("gamma",), "top_k": ("top_k",),
             "str": ("str_layers", "str_ratio"), "lr": ("lr",)}


def _str_value(value: object, where: str) -> dict:
    if value == "none":
        return {"str_layers": "none", "str_ratio": 1.0}
    if isinstance(value, dict) and set(value) == {"layers", "ratio"}:
        return {"str_layers": value["layers"], "str_ratio": value["ratio"]}
    raise UserError(f"{where}: STr value {value!r}: expected \"none\" or "
                    "{\"layers\": \"fc1\" | \"all\", \"ratio\": rho}")


def _stage_points(stage: object, method: str, where: str) -> list[dict]:
    """One stage's points as Hyper keyword dicts, in product order; every key must be one the
    method uses and every value list non-empty."""
    if not isinstance(stage, dict) or not stage:
        raise UserError(f"{where}: expected a non-empty object of value lists")
    tuned = method_entry(method).tuned
    unknown = sorted(set(stage) - set(GRID_KEYS))
    unused = [k for k in stage if k in GRID_KEYS and not set(GRID_KEYS[k]) <= set(tuned)]
    if unknown or unused:
        raise UserError(f"{where}: keys {unknown + unused} are unknown or not used by method "
                        f"{method}, which uses {list(tuned)}")
    axes = []
    for key, values in stage.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: {key}: expected a non-empty list of values")
        axes.append([_str_value(v, where) if key == "str" else {key: v} for v in values])
    points = [{k: v for part in combo for k, v in part.items()}
              for combo in itertools.product(*axes)]
    for point in points:
        build(Hyper, point, f"{where} point {point}")  # every value checked up front
    return points


def grid_stages(grid: object, method: str, where: str = "--grid") -> list[list[dict]]:
    """The grid's stages, each a list of points (Hyper keyword dicts). A grid is an object of
    value lists, one stage searching every combination, or a list of such objects: stages
    searched one after another, each at the best point of those before (the release's
    sequential search: beta and gamma, then STr, then lr). A key belongs to one stage."""
    stages = grid if isinstance(grid, list) else [grid]
    if not stages:
        raise UserError(f"{where}: expected an object of value lists or a list of them")
    found, seen = [], set()
    for i, stage in enumerate(stages):
        found.append(_stage_points(stage, method, where if len(stages) == 1 else
                                   f"{where}[{i}]"))
        repeated = sorted(seen & set(stage))
        if repeated:
            raise UserError(f"{where}: keys {repeated} appear in more than one stage")
        seen |= set(stage)
    return found


def grid_points(grid: object, method: str, where: str = "--grid") -> list[dict]:
    """Every point a selection with ``grid`` evaluates, stage after stage (a later stage's
    points hold only that stage's keys)."""
    return [point for stage in grid_stages(grid, method, where) for point in stage]


@functools.cache
def _checked_grid(method: str, grid: str) -> None:
    """Check a grid once per (method, grid), however many domains select with it."""
    grid_stages(json.loads(grid), method, "grid")


# -- job specs ------------------------------------------------------------------------------------
DEFAULT_SETTING = {"ways": 5, "shots": 1, "queries": 15}
_BUDGET_STREAM = 1  # keeps the budget draw apart from the attack start's stream


@dataclass
class TrainConfig:
    """Every knob of a meta-tuning run; defaults follow docs/method.md."""

    method: str = "amt"
    backbone: str = "dino_vits16"
    backbone_checkpoint: str | None = None
    image_size: int | None = None  # None -> the backbone's default (128 for ViT-S/16)
    pos_embed: str = POS_EMBEDS[0]  # a registry.POS_EMBEDS name (backbones.<name>.pos_embed)
    setting: dict = field(default_factory=lambda: dict(DEFAULT_SETTING))
    seed: int = 0
    epochs: int = 30
    episodes_per_epoch: int = 2000
    optimizer: str = "sgd"  # a registry.OPTIMIZERS name
    lr: float = 5e-4
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine_episode"  # a registry.SCHEDULES name
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6  # cosine_epoch_timm*: the lr warm-up starts from (timm's warmup_lr)
    min_lr: float = 1e-6  # cosine_epoch_timm*: the cosine's floor (timm's min_lr)
    keep: str = "last"  # 'best' (the best validation epoch) needs validation episodes
    rank: int = 8
    targets: tuple[str, ...] = LORA_TARGETS
    lora_init: str = "svd"  # a registry.LORA_INITS name; standard: amt_standard_init's
    # APQ's l_inf radii in [0, 1] pixels: one is fixed; with several, each episode draws one
    # (uniformly, from the run seed and the episode index: the 'random' pool strategy).
    budgets: tuple[float, ...] = (8 / 255,)
    attack_steps: int = 10
    attack_alpha: float | None = None  # None -> budget / 4
    attack_random_start: bool = True  # a zero start leaves a KL attack at the clean queries
    kl_direction: str = "clean_adv"  # KL(p_clean || p_adv): TRADES and the release
    apq: bool = True
    apsv: bool = True
    awp_gamma: float = 5e-3
    apsv_rescale: str = "layer"  # a registry.APSV_RESCALE name; the release: layer
    apsv_space: str = "factors"  # a registry.APSV_SPACES name; weight: amt_weight_space's
    apsv_detach_support: bool = True  # the ascent's support embeddings detached (the release)
    apsv_loss_support: str = "unperturbed"  # a registry.APSV_LOSS_SUPPORT name; the release
    lambda_adv: float = 6.0
    # StyleAdv (SA = lovelyqian/StyleAdv-CDFSL @ d74ba1ce): each attacked block group draws its
    # FGSM step on the style statistics from these (SA methods/engine_StyleAdv_ViT.py:53) and
    # skips its adversarial style with probability styleadv_skip (P_THRED, tool_func.py:10);
    # the global classifier learns at its own base lr (metatrain_StyleAdv_ViT.py:36, 119-125)
    styleadv_epsilons: tuple[float, ...] = (0.8, 0.08, 0.008)
    styleadv_skip: float = 0.4
    styleadv_classifier_lr: float = 1e-3
    amp: bool = True  # bfloat16 autocast, on CUDA only
    device: str = "auto"
    workers: int = 0
    checkpoint_every: int = 200
    log_every: int = 50

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.styleadv_epsilons = tuple(self.styleadv_epsilons)
        if not self.styleadv_epsilons or not all(_is_number(e, 0)
                                                 for e in self.styleadv_epsilons):
            raise UserError(f"styleadv_epsilons={self.styleadv_epsilons!r}: expected a "
                            "non-empty list of numbers >= 0")
        _expect(self, _is_number(self.styleadv_skip, 0) and self.styleadv_skip <= 1,
                "styleadv_skip", "a number in [0, 1]")
        if not isinstance(self.budgets, list | tuple) or not self.budgets:
            raise UserError(f"budgets={self.budgets!r}: expected a non-empty list of budgets")
        self.budgets = tuple(parse_budget(b, f"budgets[{i}]") for i, b in enumerate(self.budgets))
        _choice(self, "method", TRAINERS)
        if self.image_size is None:
            self.image_size = backbone_entry(self.backbone).image_size
        backbone_entry(self.backbone)
        for key, names in (("pos_embed", POS_EMBEDS), ("kl_direction", KL_DIRECTIONS),
                           ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("keep", KEEP),
                           ("apsv_rescale", APSV_RESCALE), ("apsv_space", APSV_SPACES),
                           ("lora_init", LORA_INITS),
                           ("apsv_loss_support", APSV_LOSS_SUPPORT)):
            _choice(self, key, names)
        _ints(self, 1, "image_size", "epochs", "episodes_per_epoch", "rank", "checkpoint_every",
              "log_every")
        _ints(self, 0, "seed", "warmup_epochs", "attack_steps", "workers")
        _numbers(self, 0, "lr", "momentum", "weight_decay", "warmup_lr", "min_lr", "awp_gamma",
                 "lambda_adv", "styleadv_classifier_lr")
        _expect(self, isinstance(self.apsv_detach_support, bool), "apsv_detach_support",
                "true or false")
        if self.attack_alpha is not None:
            self.attack_alpha = parse_budget(self.attack_alpha, "attack_alpha")

    @property
    def total_episodes(self) -> int:
        return self.epochs * self.episodes_per_epoch

    def episode_budget(self, index: int) -> float:
        """APQ's budget in episode ``index``: the budget, or a draw from the budgets."""
        if len(self.budgets) == 1:
            return self.budgets[0]
        rng = np.random.default_rng([self.seed, index, _BUDGET_STREAM])
        return self.budgets[int(rng.integers(len(self.budgets)))]

    def alpha(self, budget: float) -> float:
        return budget / 4 if self.attack_alpha is None else self.attack_alpha

    @property
    def adversarial_queries(self) -> bool:
        return self.method == "amt" and self.apq

    @property
    def perturbed_adapters(self) -> bool:
        return self.method == "amt" and self.apsv and self.awp_gamma > 0

    @property
    def loss_support_unperturbed(self) -> bool:
        """The final loss takes the support embeddings from the weights before APSV."""
        return self.perturbed_adapters and self.apsv_loss_support == "unperturbed"


@dataclass
class PretrainConfig:
    """Supervised pretraining of a backbone on one store's train classes (the built-in default
    has no official weights)."""

    arch: str = "small_vit"
    image_size: int | None = None  # None -> the backbone's default
    epochs: int = 10
    batch_size: int = 64  # small batches: more steps per CPU minute on ~20 images a class
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    workers: int = 0
    log_every: int = 50  # batches between progress lines
    # The augmentation: crops keep at least half the glyph, and no flips, which turn a
    # character into another or into none.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size is None:
            self.image_size = backbone_entry(self.arch).image_size
        _ints(self, 1, "image_size", "epochs", "batch_size", "log_every")
        _ints(self, 0, "seed", "warmup_epochs", "workers")
        _numbers(self, 0, "lr", "weight_decay", "label_smoothing", "flip_p")
        self.crop_scale = tuple(self.crop_scale)


# Hyper's fields a config fixes for every grid point (evaluate.<key>), not searched
FIXED_HYPER = ("ft_steps", "ft_eps", "ft_attack_steps", "str_solver", "score_precision")


@dataclass
class SelectConfig:
    """One selection job: a grid search of ``method``'s test-time hyperparameters."""

    method: str
    model: Path
    store: Path
    episodes: Path
    grid: dict
    out: Path
    base_selection: Path | None = None  # amt_ft: the amt selection holding the merge choices
    backbone_checkpoint: Path | None = None
    # Hyper's fixed fields; None -> Hyper's default (or the base selection's)
    ft_steps: int | None = None
    ft_eps: float | str | None = None  # Adv. TTF's budget, e.g. "4/255"
    ft_attack_steps: int | None = None
    str_solver: str | None = None
    score_precision: str | None = None
    seed: int = 0
    image_size: int | None = None
    resize: int | None = None
    test_transform: str = TEST_TRANSFORMS[0]  # a registry.TEST_TRANSFORMS name
    device: str = "auto"
    workers: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        for key in ("model", "store", "episodes", "out"):
            setattr(self, key, Path(getattr(self, key)))
        self.base_selection = _optional_path(self.base_selection)
        self.backbone_checkpoint = _optional_path(self.backbone_checkpoint)
        _checked_grid(self.method, json.dumps(self.grid, sort_keys=True))
        _ints(self, 0, "seed", "workers")
        _choice(self, "test_transform", TEST_TRANSFORMS)
        build(Hyper, self.fixed, "SelectConfig")

    @property
    def fixed(self) -> dict:
        """The Hyper fields it sets for every point (those given)."""
        return {k: getattr(self, k) for k in FIXED_HYPER if getattr(self, k) is not None}


@dataclass
class EvalConfig:
    """One evaluation job: clean, attacked and corrupted accuracy of one method on one domain."""

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
    test_transform: str = TEST_TRANSFORMS[0]  # a registry.TEST_TRANSFORMS name
    device: str = "auto"
    workers: int = 0
    amp: bool = True
    log_every: int = 50
    spectra_layers: tuple[str, ...] | None = None  # name suffixes; None -> every LoRA layer

    def __post_init__(self) -> None:
        method_entry(self.method)
        _choice(self, "test_transform", TEST_TRANSFORMS)
        for key in ("model", "store", "episodes", "out"):
            setattr(self, key, Path(getattr(self, key)))
        self.backbone_checkpoint = _optional_path(self.backbone_checkpoint)
        self.selection = _optional_path(self.selection)
        self.attacks = parse_attacks(self.attacks, "attacks")
        if isinstance(self.corruptions, dict):
            self.corruptions = build(CorruptionSpec, self.corruptions, "corruptions")
        if isinstance(self.sanity, dict):
            self.sanity = build(SanitySpec, self.sanity, "sanity")
        if self.spectra_layers is not None:
            self.spectra_layers = tuple(self.spectra_layers)
        _ints(self, 0, "seed", "workers")
        _ints(self, 1, "log_every")

    @property
    def sanity_path(self) -> Path:
        return self.out.with_suffix(".sanity.json")

    @property
    def spectra_path(self) -> Path:
        return self.out.with_suffix(".spectra.csv")


@dataclass
class EpisodesConfig:
    """One draw of stored episodes: ``count`` episodes of ``setting`` from one domain's store,
    for testing (kind test), hyperparameter selection (kind valid) or a training run's
    per-epoch validation (kind train_valid)."""

    store: Path
    domain: str
    kind: str
    setting_name: str
    setting: dict
    count: int
    seed: int
    out: Path

    def __post_init__(self) -> None:
        from amt.episodes import sampler_from_setting  # numpy only; imported where it is used

        self.store, self.out = Path(self.store), Path(self.out)
        _choice(self, "kind", EPISODE_KINDS)
        _ints(self, 1, "count")
        _ints(self, 0, "seed")
        sampler_from_setting(self.setting)


@dataclass
class PoolConfig:
    """One pool assembly: the member model files, in member order, and the strategy recorded."""

    members: tuple[Path, ...]
    out: Path
    strategy: str = "separate"

    def __post_init__(self) -> None:
        self.members = tuple(Path(p) for p in self.members)
        self.out = Path(self.out)
        _choice(self, "strategy", POOL_STRATEGIES)
        if not self.members:
            raise UserError("members: a pool needs at least one member model file")
        repeated = sorted({str(p) for p in self.members if self.members.count(p) > 1})
        if repeated:
            raise UserError(f"members: listed more than once: {repeated}")


@dataclass(frozen=True)
class StatsOptions:
    """How the report's tables summarise episodes (config key ``report``)."""

    std_ddof: int = 1  # the episodes' std: 1 unbiased (the release, PMF: torch.std), 0 np.std
    average_ci: str = AVERAGE_CIS[0]  # a domain average's CI: a registry.AVERAGE_CIS name

    def __post_init__(self) -> None:
        _expect(self, self.std_ddof in (0, 1) and not isinstance(self.std_ddof, bool),
                "std_ddof", "0 or 1")
        _choice(self, "average_ci", AVERAGE_CIS)


@dataclass
class ImportConfig:
    """One import of the authors' released AMT checkpoint into a pool file (``amt.release``)."""

    checkpoint: Path
    out: Path
    backbone: str = "dino_vits16"  # the release's vit_small_amt_merge is DINO's ViT-S/16
    backbone_out: Path | None = None  # None -> beside the pool: <out stem>_backbone.pt
    image_size: int | None = None  # None -> the backbone's default (128 for ViT-S/16)
    pos_embed: str = POS_EMBEDS[0]  # recorded in the pool

    def __post_init__(self) -> None:
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        self.backbone_out = _optional_path(self.backbone_out) or \
            self.out.with_name(f"{self.out.stem}_backbone.pt")
        if self.image_size is None:
            self.image_size = backbone_entry(self.backbone).image_size
        _ints(self, 1, "image_size")
        _choice(self, "pos_embed", POS_EMBEDS)
        if self.backbone_out in (self.out, self.checkpoint):
            raise UserError(f"backbone_out={str(self.backbone_out)!r}: expected a file other "
                            "than the checkpoint and the pool")


# -- JSON and the command line --------------------------------------------------------------------
def build(cls: type[Spec], values: object, where: str) -> Spec:
    """A spec from a mapping: unknown or missing keys are named with the allowed ones, and the
    dataclass checks every value."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected an object of {cls.__name__} fields")
    names = [f.name for f in fields(cls) if f.init]
    required = [f.name for f in fields(cls)
                if f.init and f.default is MISSING and f.default_factory is MISSING]
    unknown = sorted(set(values) - set(names))
    missing = [k for k in required if k not in values]
    if unknown or missing:
        raise UserError(f"{where}: unknown keys {unknown}, missing keys {missing}; allowed: "
                        f"{names}")
    try:
        return cls(**values)
    except ValueError as err:  # UserError, and the value errors of the parsers a spec runs
        raise UserError(f"{where}: {err}") from None


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def to_json(spec: object) -> str:
    """The spec as the JSON a job reads back with ``from_json`` (floats round-trip exactly)."""
    return json.dumps(_plain(spec), sort_keys=True, separators=(",", ":"))


def from_json(cls: type[Spec], text: str, overrides: dict | None = None,
              where: str = "--spec") -> Spec:
    """``cls`` from JSON text, with ``overrides`` (given flags) replacing its fields."""
    try:
        values = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a JSON object of {cls.__name__} fields")
    return build(cls, {**values, **(overrides or {})}, where)


def add_spec_argument(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--spec", default="", help=f"JSON object of {cls.__name__} fields (the "
                        "workflow's form); the other options override single fields")


def spec_from_args(cls: type[Spec], args: argparse.Namespace) -> Spec:
    """The spec of ``--spec`` with every other option the command line gave (not None)."""
    names = {f.name for f in fields(cls) if f.init}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return from_json(cls, args.spec, given)
