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
from dataclasses import dataclass, field
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
    ``switches``: the TrainConfig fields this variant sets over train.amt's (an ablation)."""

    name: str
    trainer: str
    pooled: bool = False
    switches: tuple[tuple[str, object], ...] = ()

    def trains_with(self, part: str) -> bool:
        """AMT's adversarial part ``part`` (TrainConfig's apq or apsv) is on in this run."""
        return self.trainer == "amt" and dict(self.switches).get(part, True) is not False


TRAINED: dict[str, TrainedEntry] = {e.name: e for e in (
    TrainedEntry("pm", "pm"),
    TrainedEntry("lora", "lora"),
    TrainedEntry("amt", "amt", pooled=True),
)}
TRAINERS = ("pm", "lora", "amt")

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
COMBINE = ("ttm", "uniform", "logits")  # scored top-k merge, 1/P merge, average of logits


@dataclass(frozen=True)
class MethodEntry:
    """A test-time method: which trained artefact it reads and how it adapts to an episode.

    ``trained``: a ``TRAINED`` name, or ``RELEASE`` for the authors' pool imported from their
    checkpoint. kind 'frozen': a model file (pm, lora) used as it is; kind 'pool': a LoRA pool
    combined by ``combine`` (with ``top_k`` fixed or selected), trimmed by STr if ``trim``.
    ``finetune``: PMF's test-time fine-tuning on top; ``ft_adversarial``: on attacked support
    copies (Adv. TTF). ``base``: the method whose selection it starts from."""

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
        return self.trained != "pm" and self.combine != "logits"

    @property
    def tuned(self) -> tuple[str, ...]:
        """The test-time hyperparameters it uses, which per-domain selection must set."""
        keys: tuple[str, ...] = ()
        if self.combine == "ttm":
            keys += ("beta",) if self.top_k != 1 else ()  # one member: beta cancels
            keys += ("gamma",) + (("top_k",) if self.top_k is None else ())
        return keys + (STR_KEYS if self.trim else ()) + (FINETUNE_KEYS if self.finetune else ())


def _pool(name: str, label: str, combine: str, **kw: object) -> MethodEntry:
    return MethodEntry(name, label, "amt", "pool", combine=combine, **kw)


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("pm", "PM", "pm"),
    MethodEntry("pmf", "PMF", "pm", finetune=True),
    MethodEntry("lora", "LoRA", "lora"),
    _pool("amt", "AMT", "ttm", trim=True),
    _pool("amt_ft", "AMT-FT", "ttm", trim=True, finetune=True, base="amt"),
    _pool("amt_no_ttm", "AMT w/o TTM", "uniform"),
    _pool("amt_no_str", "AMT w/o STr", "ttm"),
    _pool("amt_weight_avg", "weight average", "uniform", trim=True),
    _pool("amt_logit_avg", "logit average", "logits"),
    _pool("amt_single_best", "single best LoRA", "ttm", trim=True, top_k=1),
    # AMT on the pools of the other strategies (train.amt.pool_strategies): the pool ablation
    _pool("amt_pool_uniform", "uniform pool", "ttm", trim=True, strategy="uniform"),
    _pool("amt_pool_random", "random pool", "ttm", trim=True, strategy="random"),
    # The authors' released pool under this pipeline's protocol: TTM with k = 2 fixed, as the
    # release's router (AMT: models/protonet_merge.py:153), STr selected like amt's.
    MethodEntry("amt_release", "AMT (authors' release)", RELEASE, "pool", combine="ttm",
                trim=True, top_k=2),
)}


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
    trained = TRAINED[entry.trained] if entry.trained in TRAINED else None  # None: RELEASE
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
