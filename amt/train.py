"""Meta-tuning (pm, lora, amt) with resumable checkpoints, and pretraining of the built-in ViT.

One entry point, ``train``; the method is a config choice:

- ``pm``: the whole backbone and the ProtoNet head are trained (PMF's P>M).
- ``lora``: only the SVD-initialised adapters and the head's scale.
- ``amt``: as lora, adversarially: APQ attacks the queries (l_inf PGD maximising the KL between
  attacked and clean predictions), APSV perturbs the adapters AWP-style, and the loss is
  CE(clean) + lambda_adv * KL(adv, clean). Either part can be switched off (ablations).

Episodes are taken by index from a map-style dataset, so a run killed after its checkpoint at
episode k restarts at episode k and, on the CPU, ends with exactly the weights of an
uninterrupted run. The learning rate is a pure function of the episode index (linear warm-up,
then cosine), so the schedule's state is the episode counter.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from amt import devices
from amt.attacks import KL_DIRECTIONS, kl_divergence, kl_query_attack
from amt.backbones import BACKBONES, Backbone, build_backbone, freeze_and_fold_norms, get_spec
from amt.checkpoints import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    CheckpointError,
    environment,
    load_tagged,
    restore_rng,
    rng_state,
    save_atomic,
    sha256,
    write_json_atomic,
)
from amt.lora import DEFAULT_TARGETS, LoRAState, adapter_parameters, get_state, inject_lora
from amt.lora import load_state as load_lora_state
from amt.protonet import ProtoHead, prototypes

log = logging.getLogger(__name__)

METHODS = ("pm", "lora", "amt")
CHECKPOINT, MODEL, LOG, MANIFEST = "checkpoint.pt", "model.pt", "train_log.csv", "manifest.json"
DEFAULT_SETTING = {"ways": 5, "shots": 1, "queries": 15}
LOG_COLUMNS = ("episode", "loss", "ce", "kl", "acc", "adv_acc", "lr", "seconds")
# Knobs that may change when a run is resumed: they do not change the numbers on the CPU.
RESUMABLE_CHANGES = ("device", "workers", "log_every", "checkpoint_every")
_AWP_EPS = 1e-20  # AWP's guard against a zero ascent direction
_BUDGET_STREAM = 1  # keeps the budget draw apart from the attack start's stream


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a bad episode); the last checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every knob of a meta-tuning run; defaults follow docs/method.md."""

    method: str = "amt"
    backbone: str = "dino_vits16"
    backbone_checkpoint: str | None = None
    image_size: int | None = None  # None -> the backbone's default (128 for ViT-S/16)
    setting: dict = field(default_factory=lambda: dict(DEFAULT_SETTING))  # recorded only
    seed: int = 0
    epochs: int = 30
    episodes_per_epoch: int = 2000
    lr: float = 5e-4
    warmup_epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 0.0
    rank: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    budget: float = 8 / 255  # APQ's l_inf radius in [0, 1] pixels
    # The 'random' pool strategy: each episode draws its budget from these instead (uniformly,
    # from the run seed and the episode index, so a resumed run draws the same).
    budget_choices: tuple[float, ...] = ()
    attack_steps: int = 10
    attack_alpha: float | None = None  # None -> budget / 4
    attack_random_start: bool = True  # a zero start leaves a KL attack at the clean queries
    kl_direction: str = "adv_clean"  # KL(adv || clean) per method.md; the release: clean_adv
    apq: bool = True
    apsv: bool = True
    awp_gamma: float = 5e-3
    lambda_adv: float = 6.0
    amp: bool = True  # bfloat16 autocast, on CUDA only
    device: str = "auto"
    workers: int = 0
    checkpoint_every: int = 200
    log_every: int = 50

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.budget_choices = tuple(self.budget_choices)
        for key, eps in (("budget", self.budget),
                         *((f"budget_choices[{i}]", e) for i, e in enumerate(self.budget_choices))):
            _at_least(key, eps, 0.0)
            if eps > 1:  # pixels live in [0, 1]: a larger budget allows any image
                raise ValueError(f"config {key}={eps!r}: expected a budget in [0, 1] (pixel "
                                 "space is [0, 1]; write e.g. 8/255)")
        if self.image_size is None:
            self.image_size = get_spec(self.backbone).image_size
        _choice("method", self.method, METHODS)
        _choice("backbone", self.backbone, tuple(BACKBONES))
        _choice("kl_direction", self.kl_direction, KL_DIRECTIONS)
        for key in ("image_size", "epochs", "episodes_per_epoch", "rank", "checkpoint_every",
                    "log_every"):
            _at_least(key, getattr(self, key), 1)
        for key in ("seed", "warmup_epochs", "attack_steps", "workers"):
            _at_least(key, getattr(self, key), 0)
        for key in ("lr", "momentum", "weight_decay", "awp_gamma", "lambda_adv"):
            _at_least(key, getattr(self, key), 0.0)
        if self.attack_alpha is not None and self.attack_alpha <= 0:
            raise ValueError(f"config attack_alpha={self.attack_alpha}: expected > 0 or None")

    @property
    def total_episodes(self) -> int:
        return self.epochs * self.episodes_per_epoch

    def episode_budget(self, index: int) -> float:
        """APQ's budget in episode ``index``: ``budget``, or one of ``budget_choices``."""
        if not self.budget_choices:
            return self.budget
        rng = np.random.default_rng([self.seed, index, _BUDGET_STREAM])
        return self.budget_choices[int(rng.integers(len(self.budget_choices)))]

    def alpha(self, budget: float) -> float:
        return budget / 4 if self.attack_alpha is None else self.attack_alpha

    @property
    def adversarial_queries(self) -> bool:
        return self.method == "amt" and self.apq and \
            max(self.budget_choices or (self.budget,)) > 0

    @property
    def perturbed_adapters(self) -> bool:
        return self.method == "amt" and self.apsv and self.awp_gamma > 0


def _choice(key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config {key}={value!r}: expected one of {list(allowed)}")


def _at_least(key: str, value: object, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ValueError(f"config {key}={value!r}: expected a number >= {low}")


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay towards 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def episode_seed(seed: int, index: int) -> int:
    """Seed of the attack's random start in episode ``index``: independent of resumption."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class StepMetrics:
    loss: float
    ce: float
    acc: float
    kl: float | None = None
    adv_acc: float | None = None


def check_episode(episode: object, index: int, image_size: int) -> int:
    """Shapes and labels of ``(xs, ys, xq, yq)``; returns the number of ways."""
    if not isinstance(episode, tuple | list) or len(episode) != 4:
        raise TrainingError(f"episode {index}: expected a tuple (xs, ys, xq, yq), got "
                            f"{type(episode).__name__}")
    xs, ys, xq, yq = episode
    for part, x, y in (("support", xs, ys), ("query", xq, yq)):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, image_size, image_size) or \
                x.dtype != torch.float32:
            raise TrainingError(f"episode {index}: {part} images {tuple(x.shape)} {x.dtype}: "
                                f"expected float32 [n, 3, {image_size}, {image_size}]")
        if y.dtype != torch.int64 or tuple(y.shape) != (len(x),) or len(x) == 0:
            raise TrainingError(f"episode {index}: {part} labels {tuple(y.shape)} {y.dtype}: "
                                f"expected int64 [{len(x)}] with at least one example")
    n_way = int(ys.max()) + 1
    if int(ys.min()) < 0 or int(yq.min()) < 0 or int(yq.max()) >= n_way:
        raise TrainingError(f"episode {index}: labels must be 0..N-1 with every query class "
                            "among the support classes")
    return n_way


class MetaTuner:
    """A backbone, the ProtoNet head and the optimiser of one method; ``step`` trains on one
    episode."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        checkpoint = Path(config.backbone_checkpoint) if config.backbone_checkpoint else None
        self.backbone = build_backbone(config.backbone, checkpoint, config.image_size)
        self.head = ProtoHead()
        if config.method != "pm":
            inject_lora(self.backbone.vit, config.rank, config.targets)  # SVD on the CPU
            self.head.bias.requires_grad_(False)
        self.backbone.to(device).train()
        self.head.to(device)
        self.params = self._trainable()
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)

    def _trainable(self) -> dict[str, nn.Parameter]:
        """pm: everything (as PMF); lora and amt: the adapters and the head's scale."""
        modules = {"backbone": self.backbone, "head": self.head}
        return {f"{m}.{n}": p for m, module in modules.items()
                for n, p in module.named_parameters() if p.requires_grad}

    def autocast(self):
        return devices.autocast(self.device, self.config.amp)

    def step(self, episode: Sequence[Tensor], index: int, lr: float) -> StepMetrics:
        n_way = check_episode(episode, index, self.config.image_size)
        xs, ys, xq, yq = (t.to(self.device, non_blocking=True) for t in episode)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_adv = self.adversarial_queries(xs, ys, xq, n_way, index) \
            if self.config.adversarial_queries else None
        saved = self.perturb_adapters(xs, ys, xq, yq, x_adv, n_way) \
            if self.config.perturbed_adapters else None
        loss, metrics = self.loss(xs, ys, xq, yq, x_adv, n_way)
        if not math.isfinite(metrics.loss):
            self._restore(saved)
            raise TrainingError(f"episode {index}: non-finite loss {metrics.loss} "
                                f"(ce {metrics.ce}, kl {metrics.kl})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._restore(saved)  # before the step: SGD's update does not depend on the weights
        self.optimizer.step()
        return metrics

    def loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, x_adv: Tensor | None,
             n_way: int) -> tuple[Tensor, StepMetrics]:
        """CE on the clean queries (+ lambda_adv * mean KL with attacked queries), one forward
        pass over support, queries and attacked queries together."""
        queries = [xq] if x_adv is None else [xq, x_adv]
        with self.autocast():
            embeddings = self.backbone(torch.cat([xs, *queries]))
        support, *query_embeddings = embeddings.split([len(xs)] + [len(q) for q in queries])
        protos = prototypes(support.float(), ys, n_way)
        logits = [self.head(q, protos) for q in query_embeddings]
        ce = F.cross_entropy(logits[0], yq)
        acc = _accuracy(logits[0], yq)
        if x_adv is None:
            return ce, StepMetrics(ce.item(), ce.item(), acc)
        kl = kl_divergence(logits[1], logits[0], self.config.kl_direction).mean()
        loss = ce + self.config.lambda_adv * kl
        return loss, StepMetrics(loss.item(), ce.item(), acc, kl.item(),
                                 _accuracy(logits[1], yq))

    def adversarial_queries(self, xs: Tensor, ys: Tensor, xq: Tensor, n_way: int,
                            index: int) -> Tensor:
        """APQ against prototypes computed once per episode from the clean support."""
        with torch.no_grad(), self.autocast():
            protos = prototypes(self.backbone(xs).float(), ys, n_way)

        def logits(x: Tensor) -> Tensor:
            with self.autocast():
                return self.head(self.backbone(x), protos)

        generator = torch.Generator(self.device).manual_seed(episode_seed(self.config.seed,
                                                                          index))
        cfg = self.config
        with self._frozen():
            budget = cfg.episode_budget(index)
            return kl_query_attack(logits, xq, budget, cfg.alpha(budget), cfg.attack_steps,
                                   cfg.attack_random_start, cfg.kl_direction, generator)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The attack needs input gradients only; frozen parameters spare the LoRA backward
        the adapters' gradients (built-in ops skip them anyway)."""
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.params.values():
                p.requires_grad_(True)

    def perturb_adapters(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                         x_adv: Tensor | None, n_way: int) -> list[Tensor]:
        """APSV: one ascent direction of the training loss for every adapter tensor w, rescaled
        to ||w|| (AWP's proxy step, whose learning rate cancels in the rescaling), added times
        awp_gamma. One extra forward-backward. Returns the unperturbed tensors."""
        tensors = self._adapter_tensors()
        loss, _ = self.loss(xs, ys, xq, yq, x_adv, n_way)
        grads = torch.autograd.grad(loss, tensors)
        saved = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for t, g in zip(tensors, grads, strict=True):
                t.add_(g * (t.norm() / (g.norm() + _AWP_EPS)), alpha=self.config.awp_gamma)
        return saved

    def _adapter_tensors(self) -> list[nn.Parameter]:
        return [t for pair in adapter_parameters(self.backbone.vit).values() for t in pair]

    def _restore(self, saved: list[Tensor] | None) -> None:
        if saved is None:
            return
        with torch.no_grad():
            for t, original in zip(self._adapter_tensors(), saved, strict=True):
                t.copy_(original)

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_trainable_state(self, state: dict[str, Tensor], source: Path) -> None:
        if set(state) != set(self.params):
            missing, extra = set(self.params) - set(state), set(state) - set(self.params)
            raise CheckpointError(f"{source}: trainable tensors differ: missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def model_file(self, backbone_sha256: str | None) -> dict:
        """The finished model: pm the full backbone, lora/amt the adapters only; both the head."""
        cfg = self.config
        content = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
                   "method": cfg.method, "backbone": cfg.backbone, "image_size": cfg.image_size,
                   "backbone_checkpoint": cfg.backbone_checkpoint,
                   "backbone_sha256": backbone_sha256, "config": asdict(cfg),
                   "head": _cpu(self.head.state_dict())}
        if cfg.method == "pm":
            content["backbone_state"] = _cpu(self.backbone.vit.state_dict())
        else:
            content.update(lora=_cpu(get_state(self.backbone.vit).to_tensors()), rank=cfg.rank,
                           targets=list(cfg.targets))
        return content


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


# -- the run: checkpoints, log, manifest ----------------------------------------------------------
class TrainLog:
    """train_log.csv, appended per episode; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        kept = self._rows_before(start) if start else []
        self.file = open(path, "w", newline="")  # noqa: SIM115 - closed by close()
        self.writer = csv.writer(self.file)
        self.writer.writerow(LOG_COLUMNS)
        self.writer.writerows(kept)
        self.seconds = sum(float(row[-1]) for row in kept)

    def _rows_before(self, start: int) -> list[list[str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        return [row for row in rows if row and int(row[0]) < start]

    def write(self, index: int, m: StepMetrics, lr: float, seconds: float) -> None:
        self.seconds += seconds
        values = (m.loss, m.ce, m.kl, m.acc, m.adv_acc)
        self.writer.writerow([index, *("" if v is None else f"{v:.6g}" for v in values),
                              f"{lr:.6g}", f"{seconds:.4f}"])

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _resume(tuner: MetaTuner, config: TrainConfig, path: Path, backbone_sha: str | None
            ) -> tuple[int, dict | None]:
    """Load ``path`` if present: returns (episodes done, RNG states to restore)."""
    if not path.exists():
        return 0, None
    ckpt = load_tagged(path, CHECKPOINT_FORMAT)
    changed = {k: (ckpt["config"].get(k), v) for k, v in asdict(config).items()
               if k not in RESUMABLE_CHANGES and ckpt["config"].get(k) != v}
    if ckpt.get("backbone_sha256") != backbone_sha:
        changed["backbone file contents"] = (ckpt.get("backbone_sha256"), backbone_sha)
    if changed:
        raise CheckpointError(f"{path}: was written with another configuration "
                              f"(checkpoint, now): {changed}; delete it to start afresh")
    tuner.load_trainable_state(ckpt["trainable"], path)
    tuner.optimizer.load_state_dict(ckpt["optimizer"])
    log.info("resuming %s from episode %d", path, ckpt["episode"])
    return ckpt["episode"], ckpt["rng"]


def _save_checkpoint(tuner: MetaTuner, done: int, path: Path, backbone_sha: str | None) -> None:
    save_atomic({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                 "episode": done, "config": asdict(tuner.config),
                 "backbone_sha256": backbone_sha, "trainable": tuner.trainable_state(),
                 "optimizer": tuner.optimizer.state_dict(), "rng": rng_state()}, path)


def train(config: TrainConfig, episodes: Dataset, out_dir: Path) -> Path:
    """Meta-tune on ``episodes[i]`` = (xs, ys, xq, yq) for i < config.total_episodes; writes
    model.pt, train_log.csv and manifest.json into ``out_dir`` and returns model.pt's path.

    checkpoint.pt is written every ``checkpoint_every`` episodes and resumed from when present;
    it is deleted once model.pt is written.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = config.total_episodes
    if len(episodes) < total:
        raise ValueError(f"the episode dataset has {len(episodes)} episodes; the run needs "
                         f"{config.epochs} epochs x {config.episodes_per_epoch} = {total}")
    backbone_sha = _backbone_sha(config)
    device = devices.pick_device(config.device)
    devices.reset_peak_memory(device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    tuner = MetaTuner(config, device)
    start, rng = _resume(tuner, config, out_dir / CHECKPOINT, backbone_sha)
    loader = DataLoader(episodes, batch_size=None, sampler=range(start, total),
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    if rng is not None:
        restore_rng(rng)  # after the loader, whose own generator leaves the global one alone
    log.info("%s on %s, %s: episodes %d..%d of %d, %d trainable tensors", config.method,
             config.backbone, devices.describe(device), start, total - 1, total,
             len(tuner.params))
    train_log = TrainLog(out_dir / LOG, start)
    try:
        _run(tuner, loader, range(start, total), train_log, out_dir / CHECKPOINT, backbone_sha)
    finally:
        train_log.close()
    model_path = out_dir / MODEL
    save_atomic(tuner.model_file(backbone_sha), model_path)
    _write_manifest(tuner, out_dir, start, time.perf_counter() - started, train_log.seconds,
                    backbone_sha)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return model_path


def _backbone_sha(config: TrainConfig) -> str | None:
    if config.backbone_checkpoint is None:
        if config.method != "pm":
            raise ValueError(f"method {config.method!r} needs backbone_checkpoint: the adapters "
                             "are only meaningful on the backbone file they were trained on")
        log.warning("pm from a randomly initialised %s", config.backbone)
        return None
    path = Path(config.backbone_checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; the official file is published at "
                              f"{get_spec(config.backbone).published}")
    return sha256(path)


def _run(tuner: MetaTuner, loader: DataLoader, indices: range, train_log: TrainLog,
         checkpoint: Path, backbone_sha: str | None) -> None:
    cfg, total = tuner.config, indices.stop
    tick = time.perf_counter()
    for index, episode in zip(indices, loader, strict=True):
        lr = cosine_lr(index, total, cfg.warmup_epochs * cfg.episodes_per_epoch, cfg.lr)
        try:
            metrics = tuner.step(episode, index, lr)
        except TrainingError as err:
            kept = f"{checkpoint} kept" if checkpoint.exists() else "no checkpoint written yet"
            raise TrainingError(f"{err}; stopped ({kept})") from err
        seconds = time.perf_counter() - tick
        train_log.write(index, metrics, lr, seconds)
        done = index + 1
        if done % cfg.log_every == 0 or done == total:
            log.info("episode %d/%d loss %.4f acc %.3f%s lr %.3g %.2fs/episode", done, total,
                     metrics.loss, metrics.acc, "" if metrics.adv_acc is None else
                     f" adv_acc {metrics.adv_acc:.3f}", lr, seconds)
        if done % cfg.checkpoint_every == 0 and done < total:
            train_log.flush()
            _save_checkpoint(tuner, done, checkpoint, backbone_sha)
        tick = time.perf_counter()


def _write_manifest(tuner: MetaTuner, out_dir: Path, start: int, wall: float,
                    train_seconds: float, backbone_sha: str | None) -> None:
    cfg = tuner.config
    write_json_atomic({
        "command": "train", "config": asdict(cfg), "seed": cfg.seed,
        "environment": environment(), "device": devices.describe(tuner.device),
        "episodes": cfg.total_episodes, "resumed_from_episode": start,
        "wall_seconds": round(wall, 2), "episode_seconds_total": round(train_seconds, 2),
        "peak_memory": devices.peak_memory(tuner.device),
        "trainable_parameters": sum(p.numel() for p in tuner.params.values()),
        "backbone_sha256": backbone_sha, "outputs": [MODEL, LOG, MANIFEST],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }, out_dir / MANIFEST)


def load_trained(path: Path, backbone_checkpoint: Path | None = None,
                 device: torch.device | str = "cpu") -> tuple[Backbone, ProtoHead]:
    """A meta-tuned model.pt as (backbone, head). lora/amt files are applied (unmerged) to the
    backbone file recorded in them, or to ``backbone_checkpoint``, which must have the same
    contents (SHA-256) as the file they were trained on."""
    obj = load_tagged(Path(path), MODEL_FORMAT)
    if obj["method"] not in METHODS:
        raise CheckpointError(f"{path}: a {obj['method']!r} model file has no ProtoNet head")
    if obj["method"] == "pm":
        backbone = build_backbone(obj["backbone"], Path(path), obj["image_size"])
    else:
        base = Path(backbone_checkpoint or obj["backbone_checkpoint"])
        if obj["backbone_sha256"] and sha256(base) != obj["backbone_sha256"]:
            raise CheckpointError(f"{path}: its adapters were trained on a backbone file with "
                                  f"SHA-256 {obj['backbone_sha256']}, {base} differs")
        backbone = build_backbone(obj["backbone"], base, obj["image_size"])
        inject_lora(backbone.vit, obj["rank"], obj["targets"])
        load_lora_state(backbone.vit, LoRAState.from_tensors(obj["lora"]))
    head = ProtoHead()
    head.load_state_dict(obj["head"])
    return backbone.to(device), head.to(device)


# -- pretraining of the built-in backbone ---------------------------------------------------------
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
    # The command's augmentation (recorded here): crops keep at least half the glyph, and no
    # flips, which turn a character into another or into none.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.0

    def __post_init__(self) -> None:
        _choice("arch", self.arch, tuple(BACKBONES))
        if self.image_size is None:
            self.image_size = get_spec(self.arch).image_size
        for key in ("image_size", "epochs", "batch_size", "log_every"):
            _at_least(key, getattr(self, key), 1)
        for key in ("seed", "warmup_epochs", "workers", "lr", "weight_decay", "label_smoothing",
                    "flip_p"):
            _at_least(key, getattr(self, key), 0)
        self.crop_scale = tuple(self.crop_scale)


class StoreImages(Dataset):
    """The images of one split of a DomainStore as (tensor, label), labels renumbered 0..C-1.

    ``transform(image, rng)`` gets a generator fixed by (seed, epoch, index): augmentations do
    not depend on worker count or order.
    """

    def __init__(self, store, split: str, transform, seed: int) -> None:
        classes = store.classes_in_split(split)
        if len(classes) < 2:
            raise ValueError(f"{store.path}: split {split!r} has {len(classes)} classes; "
                             "supervised pretraining needs at least 2")
        self.store, self.transform, self.seed, self.epoch = store, transform, seed, 0
        self.indices = np.concatenate([store.images_of_class(c) for c in classes])
        self.labels = np.repeat(np.arange(len(classes)), store.class_sizes[classes])
        self.num_classes = len(classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return self.transform(self.store.read(int(self.indices[i])), rng), int(self.labels[i])


def pretrain(config: PretrainConfig, dataset: Dataset, num_classes: int, out_dir: Path) -> Path:
    """Cross-entropy classification with a linear layer on the backbone's embedding (AdamW,
    warm-up + cosine per step); writes model.pt (the backbone, loadable by build_backbone),
    train_log.csv (per epoch) and manifest.json."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = devices.pick_device(config.device)
    devices.reset_peak_memory(device)
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.arch, None, config.image_size, frozen_norms=False).to(device)
    classifier = nn.Linear(backbone.embed_dim, num_classes).to(device)
    model = nn.Sequential(backbone, classifier)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images: fewer than one batch of {config.batch_size}")
    rows = [_pretrain_epoch(model, optimizer, loader, config, epoch, device)
            for epoch in range(config.epochs)]
    with open(out_dir / LOG, "w", newline="") as f:
        csv.writer(f).writerows([("epoch", "loss", "acc", "lr", "seconds"), *rows])
    save_atomic({"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "method": "pretrain",
                 "backbone": config.arch, "image_size": config.image_size,
                 # norms frozen as build_backbone loads them, and folded into the convs
                 "backbone_state": _cpu(freeze_and_fold_norms(backbone.vit).state_dict()),
                 "classifier": _cpu(classifier.state_dict()), "num_classes": num_classes,
                 "config": asdict(config)}, out_dir / MODEL)
    write_json_atomic({
        "command": "pretrain", "config": asdict(config), "seed": config.seed,
        "environment": environment(), "device": devices.describe(device),
        "images": len(dataset), "classes": num_classes,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "final_train_loss": rows[-1][1], "final_train_acc": rows[-1][2],
        "peak_memory": devices.peak_memory(device), "outputs": [MODEL, LOG, MANIFEST],
    }, out_dir / MANIFEST)
    return out_dir / MODEL


def _pretrain_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    config: PretrainConfig, epoch: int, device: torch.device) -> tuple:
    tick = time.perf_counter()
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    total, warmup = config.epochs * len(loader), config.warmup_epochs * len(loader)
    loss_sum = correct = seen = 0.0
    for i, (images, labels) in enumerate(loader):
        lr = cosine_lr(epoch * len(loader) + i, total, warmup, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with devices.autocast(device, config.amp):
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        if not math.isfinite(loss.item()):
            raise TrainingError(f"pretrain epoch {epoch} batch {i}: non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
        if (i + 1) % config.log_every == 0:
            log.info("pretrain epoch %d batch %d/%d loss %.4f %.0f images/s", epoch + 1, i + 1,
                     len(loader), loss_sum / seen, seen / (time.perf_counter() - tick))
    row = (epoch, round(loss_sum / seen, 5), round(correct / seen, 5), f"{lr:.6g}",
           round(time.perf_counter() - tick, 2))
    log.info("pretrain epoch %d/%d loss %.4f acc %.3f %.1fs", epoch + 1, config.epochs, *row[1:3],
             row[4])
    return row


# -- command line ---------------------------------------------------------------------------------
def budget_value(text: str) -> float:
    """'8/255' or '0.03137' -> float (budgets read best as fractions of 255)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"budget {text!r}: expected a number or a "
                                         "fraction like 8/255") from err


_TRAIN_OPTIONS = {  # option -> (TrainConfig field, type, help)
    "--seed": ("seed", int, "run seed (episodes come from the dataset's own seed)"),
    "--epochs": ("epochs", int, None),
    "--episodes-per-epoch": ("episodes_per_epoch", int, None),
    "--lr": ("lr", float, "base learning rate (SGD, momentum 0.9, cosine)"),
    "--warmup-epochs": ("warmup_epochs", int, None),
    "--image-size": ("image_size", int, "input size (default: the backbone's)"),
    "--rank": ("rank", int, "LoRA rank"),
    "--budget": ("budget", budget_value, "APQ l_inf budget, e.g. 8/255"),
    "--attack-steps": ("attack_steps", int, None),
    "--attack-alpha": ("attack_alpha", budget_value, "step size (default budget/4)"),
    "--awp-gamma": ("awp_gamma", float, "APSV's relative perturbation size"),
    "--lambda-adv": ("lambda_adv", float, "weight of the KL term"),
    "--kl-direction": ("kl_direction", str, f"one of {KL_DIRECTIONS}"),
    "--workers": ("workers", int, "DataLoader worker processes"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--checkpoint-every": ("checkpoint_every", int, "episodes between checkpoints"),
    "--log-every": ("log_every", int, "episodes between progress lines"),
}
_TRAIN_SWITCHES = {"--apq": "apq", "--apsv": "apsv", "--attack-random-start": "attack_random_start",
                   "--amp": "amp"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``pretrain`` commands."""
    p = subparsers.add_parser("train", help="meta-tune a backbone (pm, lora or amt)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--backbone", choices=sorted(BACKBONES), required=True)
    p.add_argument("--backbone-checkpoint", type=Path, required=True)
    p.add_argument("--stores", type=Path, nargs="+", required=True, help="HDF5 domain files")
    p.add_argument("--split", default="train")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--variable", action="store_true", help="Meta-Dataset variable way/shot")
    for option, (key, kind, text) in _TRAIN_OPTIONS.items():
        p.add_argument(option, dest=key, type=kind, help=text)
    for option, key in _TRAIN_SWITCHES.items():
        p.add_argument(option, dest=key, action=argparse.BooleanOptionalAction)
    p.add_argument("--budget-choices", dest="budget_choices", type=budget_value, nargs="+",
                   help="draw each episode's APQ budget from these (the 'random' pool)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_train)

    q = subparsers.add_parser("pretrain", help="supervised pretraining of the built-in backbone")
    q.add_argument("--store", type=Path, required=True)
    q.add_argument("--arch", choices=sorted(BACKBONES), default="small_vit")
    for option in ("--image-size", "--epochs", "--batch-size", "--seed", "--workers"):
        q.add_argument(option, type=int)
    q.add_argument("--lr", type=float)
    q.add_argument("--device")
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=cmd_pretrain)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags given on the command line override TrainConfig's defaults (defined only there)."""
    keys = [key for key, _, _ in _TRAIN_OPTIONS.values()] + list(_TRAIN_SWITCHES.values()) + \
        ["budget_choices"]
    given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    fixed = {k: getattr(args, k) for k in ("ways", "shots", "queries")
             if getattr(args, k) is not None}
    if args.variable and fixed:
        raise ValueError(f"--variable excludes {sorted(fixed)}")
    if args.variable:
        given["setting"] = {"variable": True}
    elif fixed:
        given["setting"] = {**DEFAULT_SETTING, **fixed}
    return TrainConfig(method=args.method, backbone=args.backbone,
                       backbone_checkpoint=str(args.backbone_checkpoint), **given)


def cmd_train(args: argparse.Namespace) -> int:
    from amt.episodes import SampledEpisodeDataset, sampler_from_setting
    from amt.transforms import train_transform
    from data_prep.store import DomainStore

    config = train_config_from_args(args)
    stores = [DomainStore(path) for path in args.stores]
    dataset = SampledEpisodeDataset(stores, args.split, sampler_from_setting(config.setting),
                                    train_transform(config.image_size), seed=config.seed,
                                    length=config.total_episodes)
    train(config, dataset, args.out)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from amt.transforms import TrainTransform
    from data_prep.store import DomainStore

    keys = ("image_size", "epochs", "batch_size", "seed", "workers", "lr", "device")
    config = PretrainConfig(arch=args.arch, **{k: getattr(args, k) for k in keys
                                               if getattr(args, k) is not None})
    transform = TrainTransform(config.image_size, scale=config.crop_scale, flip_p=config.flip_p)
    dataset = StoreImages(DomainStore(args.store), "train", transform, config.seed)
    pretrain(config, dataset, dataset.num_classes, args.out)
    return 0
