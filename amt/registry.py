"""The names and facts everything else reads, free of torch.

Test-time methods and how each is built, trained methods, the authors' released pool, pool
strategies, attacks, norms, corruptions and their severities, STr layer choices, meta-tuning
choices (KL direction, optimiser, schedule, kept epoch, APSV variants), episode kinds, backbones,
and the one budget parser. The schema's enums, the config check, the workflow plan, the jobs and
the report all read this module; ``tests/test_registry.py`` fails when any of them disagrees
with it.

Adding a test-time method is one ``MethodEntry`` here, its class in ``amt/methods.py`` (if no
existing kind builds it) and its grid in the configs. Adding a backbone of a known checkpoint
family is one ``BackboneEntry``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

from amt.errors import UserError


# -- budgets --------------------------------------------------------------------------------------
def parse_budget(value: object, where: str) -> float:
    """'k/255', '0.03' or a number -> a float in (0, 1]: pixels live in [0, 1], so a larger
    budget (8 meant as 8/255, say) would allow any image."""
    try:
        if isinstance(value, bool):
            raise TypeError
        eps = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise UserError(f"{where}: budget {value!r} is not a number or a fraction like "
                        "'2/255' (with a non-zero denominator)") from err
    if not math.isfinite(eps) or not 0 < eps <= 1:
        raise UserError(f"{where}: budget {value!r}: expected a value in (0, 1] (pixel space "
                        "is [0, 1]; write e.g. '8/255')")
    return eps


# -- threat model ---------------------------------------------------------------------------------
# autoattack: the worst case per query over torchattacks' AutoAttack (standard): APGD-CE, APGD-T,
# FAB-T and Square (amt/conditions.py)
ATTACKS = ("pgd", "apgd_ce", "apgd_t", "autoattack")
NORMS = ("linf", "l2")
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur",
               "contrast", "brightness", "jpeg")
SEVERITIES = (1, 2, 3, 4, 5)
KL_DIRECTIONS = ("clean_adv", "adv_clean")  # KL(p_clean || p_adv) (TRADES); KL(p_adv || p_clean)

# -- meta-tuning choices --------------------------------------------------------------------------
OPTIMIZERS = ("sgd", "adamw")
# cosine_episode: linear warm-up then cosine, per episode; cosine_epoch_timm: timm's per-epoch
# cosine as the AMT release steps it (before each epoch); _after: as PMF steps it (after each)
SCHEDULES = ("cosine_episode", "cosine_epoch_timm", "cosine_epoch_timm_after")
KEEP = ("best", "last")  # the epoch whose weights a run writes: best validation accuracy, or last
# What APSV perturbs: the adapters' factors A and B (AMT: their SVD initialisation makes this a
# perturbation of singular values and vectors), or the weight's delta B A as one weight-space
# tensor (the paper's weight-space ablation)
APSV_SPACES = ("factors", "weight")
# How the adapters start: the top-r SVD of W (W_res = W - B A), or the usual LoRA initialisation
# (peft's: A Kaiming-uniform, B zero, W_res = W)
LORA_INITS = ("svd", "standard")
# APSV's rescaling unit: a layer's A (and B) over all its output blocks (the release's fused qkv
# tensors), or each block's adapter tensor
APSV_RESCALE = ("layer", "block")
# where the final loss takes the support embeddings from: the unperturbed weights w (the
# release), or the perturbed w + v
APSV_LOSS_SUPPORT = ("unperturbed", "perturbed")

# -- stored episodes ------------------------------------------------------------------------------
# test: evaluation; valid: test-time hyperparameter selection; train_valid: the validation of a
# training run after every epoch (the valid split only)
EPISODE_KINDS = ("test", "valid", "train_valid")

# -- LoRA layers and singular value trimming ------------------------------------------------------
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # layer-name suffixes
STR_LAYERS: dict[str, tuple[str, ...]] = {"none": (), "fc1": ("mlp.fc1",), "all": LORA_TARGETS}
# STr's truncation: the exact best rank-k approximation, or the release's randomised
# torch.svd_lowrank(q=k, niter=2) (seeded per episode)
STR_SOLVERS = ("exact", "lowrank")

# -- test time ------------------------------------------------------------------------------------
# Precision of TTM's member scoring: float32 (the release: autocast off) or the job's amp dtype.
SCORE_PRECISIONS = ("fp32", "amp")
# How a stored image becomes the model's input: "crop" keeps the aspect ratio (shorter side to
# `resize`, centre crop); "squash" resizes to resize x resize, then centre crops (BSCD-FSL).
TEST_TRANSFORMS = ("crop", "squash")
# Position embeddings at another input size than the checkpoint's: "resample" once at load
# (timm), or "interpolate" the checkpoint's grid on every forward (DINO, PMF, the release).
POS_EMBEDS = ("resample", "interpolate")

# -- report ---------------------------------------------------------------------------------------
# A domain average's CI: sqrt(sum of the domains' CI^2) / D (independent domains), or the mean
# of the domains' CIs (the release's test_meta_dataset.py)
AVERAGE_CIS = ("pooled", "mean")

# -- trained methods ------------------------------------------------------------------------------
POOL_STRATEGIES = ("separate", "uniform", "random")  # how a pool's members get their budgets


@dataclass(frozen=True)
class TrainedEntry:
    """A meta-tuning run: ``trainer`` is the algorithm of ``python -m amt train --method``;
    a pooled entry trains one member per budget and is assembled into one pool per strategy.
    ``switches``: the TrainConfig fields this variant sets over train.amt's (an ablation).
    ``single_budget``: one run at train.amt.single_budget instead of a pool."""

    name: str
    trainer: str
    pooled: bool = False
    switches: tuple[tuple[str, object], ...] = ()
    single_budget: bool = False

    def trains_with(self, part: str) -> bool:
        """AMT's adversarial part ``part`` (TrainConfig's apq or apsv) is on in this run."""
        return self.trainer == "amt" and dict(self.switches).get(part, True) is not False


class Names(dict):
    """A registry table that also holds the names a sweep generates (``amt_lambda_3``): looked
    up, they resolve to their family's entry made concrete (``Sweep.entry``); iterated, only
    the written names appear."""

    def __missing__(self, name: str) -> object:
        found = sweep_of(name)
        if found is None or found[0].family not in self:
            raise KeyError(name)
        sweep, value = found
        return sweep.entry(dict.__getitem__(self, sweep.family), name, value)

    def __contains__(self, name: object) -> bool:
        if super().__contains__(name):
            return True
        found = isinstance(name, str) and sweep_of(name)
        return bool(found) and super().__contains__(found[0].family)

    def pattern(self, keep=lambda entry: True) -> str:
        """A regex alternation of the names whose entries ``keep`` accepts, each sweep's
        generated names included (Snakemake's wildcard constraints)."""
        names = [re.escape(n) for n, e in self.items() if keep(e) and n not in SWEEPS]
        names += [s.pattern for s in SWEEPS.values()
                  if s.family in self and keep(dict.__getitem__(self, s.family))]
        return "|".join(names)


@dataclass(frozen=True)
class Sweep:
    """A family of trained variants, one per value of the list ``train.amt.<key>``: the family
    name (in train.methods, evaluate.methods and evaluate.grids) stands for the generated names
    ``<family>_<value>`` (a decimal point written p: amt_lambda_0p5), each a pool trained with
    TrainConfig ``field`` at that value and evaluated as the family's method."""

    family: str
    key: str
    field: str
    label: str  # a generated method's row label, formatted with its value

    @property
    def pattern(self) -> str:
        return rf"{re.escape(self.family)}_[0-9]+(?:p[0-9]+)?"

    def name(self, value: float) -> str:
        return f"{self.family}_{value:g}".replace(".", "p")

    def entry(self, family_entry: object, name: str, value: float) -> object:
        if isinstance(family_entry, TrainedEntry):
            return replace(family_entry, name=name,
                           switches=family_entry.switches + ((self.field, value),))
        return replace(family_entry, name=name, trained=name,
                       label=self.label.format(value=value))


SWEEPS: dict[str, Sweep] = {s.family: s for s in (
    Sweep("amt_lambda", "lambda_adv_sweep", "lambda_adv", "AMT (λ_adv = {value:g})"),
)}


def sweep_of(name: str) -> tuple[Sweep, float] | None:
    """(its sweep, its value) for a generated name, else None."""
    for sweep in SWEEPS.values():
        if re.fullmatch(sweep.pattern, name):
            return sweep, float(name[len(sweep.family) + 1:].replace("p", "."))
    return None


_AMT = "amt"
TRAINED: Names = Names({e.name: e for e in (
    TrainedEntry("pm", "pm"),
    TrainedEntry("lora", "lora"),
    TrainedEntry(_AMT, _AMT, pooled=True),
    # The paper's trained ablations: pools (separate strategy) with one part switched off or
    # changed, and one adversarial LoRA without a pool (RLP off)
    TrainedEntry("amt_no_apq", _AMT, pooled=True, switches=(("apq", False),)),
    TrainedEntry("amt_no_apsv", _AMT, pooled=True, switches=(("apsv", False),)),
    TrainedEntry("amt_weight_space", _AMT, pooled=True, switches=(("apsv_space", "weight"),)),
    TrainedEntry("amt_standard_init", _AMT, pooled=True, switches=(("lora_init", "standard"),)),
    TrainedEntry("amt_lambda", _AMT, pooled=True),  # a sweep: SWEEPS["amt_lambda"]
    TrainedEntry("amt_single", _AMT, single_budget=True),
    # StyleAdv (Fu et al., CVPR 2023): the whole backbone meta-trained with adversarial styles
    TrainedEntry("styleadv", "styleadv"),
)})
TRAINERS = ("pm", "lora", "amt", "styleadv")
FULL_BACKBONE_TRAINERS = ("pm", "styleadv")  # model files holding the whole backbone

# -- the authors' released pool (imported, not trained) -------------------------------------------
RELEASE = "release"  # the ``trained`` of methods over it: ``python -m amt import-release``
RELEASE_PUBLISHED = ("https://github.com/xyang583/AMT/tree/main/checkpoints (the GitHub "
                     "repository xyang583/AMT, commit ca4b8190, folder checkpoints/: "
                     "metadataset_imagenet_advmetatuned_5w1s.pth and _5w5s.pth, the meta-tuned "
                     "weights of its README's Tables 1-3)")

# -- test-time methods ----------------------------------------------------------------------------
MERGE_KEYS = ("beta", "gamma", "top_k")
STR_KEYS = ("str_layers", "str_ratio")
FINETUNE_KEYS = ("lr",)
# scored top-k merge, 1/P merge, average of logits, a linear classifier over the members' logits
COMBINE = ("ttm", "uniform", "logits", "linear")
# What test-time fine-tuning trains: every backbone tensor (PMF), or only ATTNSCALE's scaling
# vectors of the attention matrices (Basu et al., AAAI 2024; amt.methods.AttentionScaling)
FINETUNE_PARAMS = ("full", "attnscale")


@dataclass(frozen=True)
class MethodEntry:
    """A test-time method: which trained artefact it reads and how it adapts to an episode.

    ``trained``: a ``TRAINED`` name, or ``RELEASE`` for the authors' pool imported from their
    checkpoint. kind 'frozen': a model file (pm, lora, amt_single) used as it is; kind 'pool':
    a LoRA pool combined by ``combine`` (with ``top_k`` fixed or selected), trimmed by STr if
    ``trim``. ``finetune``: test-time fine-tuning on top, of ``ft_params`` (a
    ``FINETUNE_PARAMS`` name); ``ft_adversarial``: on PGD-attacked copies of the augmented
    support (Adv. TTF). ``base``: the method whose selection it starts from."""

    name: str
    label: str
    trained: str
    kind: str = "frozen"
    strategy: str = "separate"
    combine: str | None = None
    trim: bool = False
    top_k: int | None = None
    finetune: bool = False
    base: str | None = None
    ft_params: str = "full"
    ft_adversarial: bool = False

    @property
    def pooled(self) -> bool:
        return self.kind == "pool"

    @property
    def released(self) -> bool:
        """It reads the authors' released pool, imported rather than trained."""
        return self.trained == RELEASE

    @property
    def merges(self) -> bool:
        """Its episode model holds merged LoRA weights (their spectra are an output)."""
        return self.trained not in FULL_BACKBONE_TRAINERS and \
            self.combine not in ("logits", "linear")

    @property
    def tuned(self) -> tuple[str, ...]:
        """The test-time hyperparameters it uses, which per-domain selection must set."""
        keys: tuple[str, ...] = ()
        if self.combine == "ttm":
            keys += ("beta",) if self.top_k != 1 else ()  # one member: beta cancels
            keys += ("gamma",) + (("top_k",) if self.top_k is None else ())
        return keys + (STR_KEYS if self.trim else ()) + (FINETUNE_KEYS if self.finetune else ())


def _pool(name: str, label: str, combine: str, trained: str = _AMT, **kw: object
          ) -> MethodEntry:
    return MethodEntry(name, label, trained, "pool", combine=combine, **kw)


def _ablation(name: str, label: str) -> MethodEntry:
    """AMT's test-time merging (TTM, STr) over the pool of the trained variant ``name``."""
    return _pool(name, label, "ttm", trained=name, trim=True)


METHODS: Names = Names({e.name: e for e in (
    MethodEntry("pm", "PM", "pm"),
    MethodEntry("pmf", "PMF", "pm", finetune=True),
    # Adversarial test-time fine-tuning (Adv. TTF): PMF's, on attacked support copies
    MethodEntry("pmf_adv", "PMF (Adv. TTF)", "pm", finetune=True, ft_adversarial=True),
    MethodEntry("styleadv", "StyleAdv", "styleadv"),
    MethodEntry("styleadv_ft", "StyleAdv-FT", "styleadv", finetune=True),
    MethodEntry("attnscale", "ATTNSCALE", "pm", finetune=True, ft_params="attnscale"),
    MethodEntry("lora", "LoRA", "lora"),
    _pool("amt", "AMT", "ttm", trim=True),
    _pool("amt_ft", "AMT-FT", "ttm", trim=True, finetune=True, base="amt"),
    _pool("amt_ft_adv", "AMT-FT (Adv. TTF)", "ttm", trim=True, finetune=True, base="amt",
          ft_adversarial=True),
    _pool("attnscale_amt_ft", "ATTNSCALE+AMT-FT", "ttm", trim=True, finetune=True, base="amt",
          ft_params="attnscale"),
    _pool("amt_no_ttm", "AMT w/o TTM", "uniform"),
    _pool("amt_no_str", "AMT w/o STr", "ttm"),
    _pool("amt_weight_avg", "weight average", "uniform", trim=True),
    _pool("amt_logit_avg", "logit average", "logits"),
    _pool("amt_single_best", "single best LoRA", "ttm", trim=True, top_k=1),
    _pool("amt_linear", "linear classifier", "linear"),
    # the trained ablations (TRAINED): AMT's merging over each variant's pool; amt_single's
    # one adversarial LoRA as a frozen model (no pool, nothing to merge)
    _ablation("amt_no_apq", "AMT w/o APQ"),
    _ablation("amt_no_apsv", "AMT w/o APSV"),
    _ablation("amt_weight_space", "AMT, weight-space perturbation"),
    _ablation("amt_standard_init", "AMT, standard LoRA init"),
    _ablation("amt_lambda", "AMT, λ_adv sweep"),  # evaluates each amt_lambda_<v>
    MethodEntry("amt_single", "AMT w/o RLP (one LoRA)", "amt_single"),
    # AMT on the pools of the other strategies (train.amt.pool_strategies): the pool ablation
    _pool("amt_pool_uniform", "uniform pool", "ttm", trim=True, strategy="uniform"),
    _pool("amt_pool_random", "random pool", "ttm", trim=True, strategy="random"),
    # The authors' released pool under this pipeline's protocol: TTM with k = 2 fixed, as the
    # release's router (AMT: models/protonet_merge.py:153), STr selected like amt's.
    MethodEntry("amt_release", "AMT (authors' release)", RELEASE, "pool", combine="ttm",
                trim=True, top_k=2),
)})


# -- backbones ------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OWN_WEIGHTS = "produced by `python -m amt pretrain`"


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone: the timm architecture, the checkpoint family whose key layout its files use
    (``amt.backbones.REMAPS``), the default input size and where its official file is published
    (nothing is downloaded). ``kwargs`` are timm's, with ``embed_layer`` named, not imported."""

    name: str
    arch: str
    family: str
    image_size: int
    published: str
    kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def pretrained_here(self) -> bool:
        """No official file: the pipeline pretrains it (``python -m amt pretrain``)."""
        return self.published == OWN_WEIGHTS


_VITS16 = "vit_small_patch16_224"  # embed 384, depth 12, 6 heads, qkv bias, LayerNorm eps 1e-6
_HALF = (0.5, 0.5, 0.5)

BACKBONES: dict[str, BackboneEntry] = {e.name: e for e in (
    BackboneEntry("dino_vits16", _VITS16, "dino", 128, "https://dl.fbaipublicfiles.com/dino/"
                  "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    BackboneEntry("ibot_vits16", _VITS16, "ibot", 128, "https://lf3-nlp-opensource.bytetos.com/"
                  "obj/nlp-opensource/archive/2022/ibot/vits_16/checkpoint_teacher.pth"),
    BackboneEntry("deit_vits16", _VITS16, "deit", 128,
                  "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"),
    # The built-in default: 4 blocks of width 128 (4 heads) on a convolutional stem that turns
    # 32-px images into a 4x4 grid of tokens, and global average pooling (a CLS token learns
    # 2x slower from scratch). ~700 images/s forward-backward on 2 CPU cores, so supervised
    # pretraining on the glyphs' 879 train classes takes about two minutes.
    BackboneEntry("small_vit", "vit_tiny_patch16_224", "own", 32, OWN_WEIGHTS,
                  {"depth": 4, "embed_dim": 128, "num_heads": 4, "patch_size": 8,
                   "embed_layer": "conv_stem", "global_pool": "avg"}, _HALF, _HALF),
    # Tests and smoke runs only: two blocks of width 32 on 32 px images.
    BackboneEntry("tiny_vit", "test_vit", "own", 32, OWN_WEIGHTS,
                  {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, _HALF, _HALF),
)}


# -- the paper's ablation table ------------------------------------------------------------------
# AMT's components, each switched off in a row of the paper's ablation: the adversarial query
# set and the adversarial perturbation of singular values (meta-tuning), the robust LoRA pool,
# test-time merging and singular value trimming (test time)
COMPONENTS = ("APQ", "APSV", "RLP", "TTM", "STr")


def components(method: str) -> dict[str, bool]:
    """Which of AMT's components ``method`` uses, from its entries: APQ and APSV from its
    trained run's trainer and switches (the authors' released pool: both, it is adversarially
    meta-tuned), RLP a pool, TTM the scored merge, STr the trimming."""
    entry = method_entry(method)
    trained = None if entry.trained == RELEASE else TRAINED[entry.trained]
    adversarial = {part: trained.trains_with(part.lower()) if trained else entry.released
                   for part in ("APQ", "APSV")}
    return {**adversarial, "RLP": entry.pooled, "TTM": entry.combine == "ttm",
            "STr": entry.trim}


def backbone_entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise UserError(f"backbone {name!r}: expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise UserError(f"method {name!r}: expected one of {list(METHODS)}")
    return METHODS[name]
