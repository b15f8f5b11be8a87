"""Meta-tuning (pm, lora, amt, styleadv) with resumable checkpoints.

One entry point, ``train``; the method is a config choice:

- ``pm``: the whole backbone and the ProtoNet head are trained (PMF's P>M).
- ``lora``: only the SVD-initialised adapters and the head's scale.
- ``styleadv``: the whole backbone as pm, with StyleAdv's adversarial styles and global
  classifier (``amt.styleadv``).
- ``amt``: as lora, adversarially: APQ attacks the queries (l_inf PGD maximising the KL between
  clean and attacked predictions), APSV perturbs the adapters AWP-style, and the loss is
  CE(clean) + lambda_adv * mean KL (direction ``kl_direction``; the release's KL(p_clean ||
  p_adv)). Either part can be switched off, APSV can perturb the weight-space delta B A instead
  of the factors (``apsv_space``) and the adapters can start as the usual LoRA instead of the
  SVD (``lora_init``): the paper's ablations.

Episodes are taken by index from a map-style dataset, so a run killed after its checkpoint at
episode k restarts at episode k and, on the CPU, ends with exactly the weights of an
uninterrupted run. The learning rate is a pure function of the episode index
(``amt.schedule.episode_lr``), so the schedule's state is the episode counter.

After every epoch (and once before training) the model is validated on stored episodes: clean
ProtoNet accuracy on each validation domain, averaged over domains (the release's score). With
``keep: best`` the run writes the weights of its best epoch; the checkpoint holds the validation
so far and the best epoch's tensors, so a resumed run keeps the same epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from amt import devices
from amt.attacks import kl_divergence, kl_query_attack
from amt.backbones import build_backbone
from amt.checkpoints import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    LOG,
    MANIFEST,
    MODEL,
    MODEL_FORMAT,
    VALID_LOG,
    CheckpointError,
    TrainingError,
    cpu_state,
    environment,
    load_tagged,
    restore_rng,
    rng_state,
    save_atomic,
    sha256,
    write_json_atomic,
)
from amt.errors import UserError
from amt.lora import (
    RESIDUAL_OF_INIT,
    LoRALinear,
    adapter_delta,
    adapter_parameters,
    get_state,
    inject_lora,
    lora_layers,
    standard_init,
)
from amt.protonet import ProtoHead, prototypes
from amt.registry import FULL_BACKBONE_TRAINERS, TRAINERS, backbone_entry
from amt.schedule import episode_lr
from amt.specs import TrainConfig, add_spec_argument, spec_from_args

log = logging.getLogger(__name__)

LOG_COLUMNS = ("episode", "loss", "ce", "kl", "acc", "adv_acc", "lr", "seconds")
# Knobs that may change when a run is resumed: they do not change the numbers on the CPU.
RESUMABLE_CHANGES = ("device", "workers", "log_every", "checkpoint_every")
_AWP_EPS = 1e-20  # AWP's guard against a zero ascent direction


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
        self.backbone = build_backbone(config.backbone, checkpoint, config.image_size,
                                       pos_embed=config.pos_embed)
        self.head = ProtoHead()
        if config.method not in FULL_BACKBONE_TRAINERS:
            inject_lora(self.backbone.vit, config.rank, config.targets,  # SVD on the CPU
                        RESIDUAL_OF_INIT[config.lora_init])
            if config.lora_init == "standard":
                standard_init(self.backbone.vit)
            self.head.bias.requires_grad_(False)
        self.backbone.to(device).train()
        self.head.to(device)
        self.params = self._trainable()
        self.optimizer = self._optimizer()

    def _trainable(self) -> dict[str, nn.Parameter]:
        """pm: everything (as PMF); lora and amt: the adapters and the head's scale."""
        modules = {"backbone": self.backbone, "head": self.head}
        return {f"{m}.{n}": p for m, module in modules.items()
                for n, p in module.named_parameters() if p.requires_grad}

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.config, list(self.params.values())
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def autocast(self):
        return devices.autocast(self.device, self.config.amp)

    def step(self, episode: Sequence[Tensor], index: int, lr: float) -> StepMetrics:
        n_way = check_episode(episode, index, self.config.image_size)
        xs, ys, xq, yq = (t.to(self.device, non_blocking=True) for t in episode)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        cfg = self.config
        support = self.unperturbed_support(xs)
        x_adv = self.adversarial_queries(ys, xq, n_way, index, support) \
            if cfg.adversarial_queries else None
        saved = self.perturb_adapters(xs, ys, xq, yq, x_adv, n_way, support) \
            if cfg.perturbed_adapters else None
        loss, metrics = self.loss(xs, ys, xq, yq, x_adv, n_way,
                                  support if cfg.loss_support_unperturbed else None)
        if not math.isfinite(metrics.loss):
            self._restore(saved)
            raise TrainingError(f"episode {index}: non-finite loss {metrics.loss} "
                                f"(ce {metrics.ce}, kl {metrics.kl})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Before the step, so that the update (its weight decay included) is applied at the
        # unperturbed weights; the release restores after its plain SGD step: the same numbers.
        self._restore(saved)
        self.optimizer.step()
        return metrics

    def unperturbed_support(self, xs: Tensor) -> Tensor | None:
        """The support embeddings at the unperturbed weights w, computed once for every part that
        takes them from there. With their graph when the final loss does (the release: the
        gradient flows through them, evaluated at w, while the queries are at w + v; LoRALinear
        stacks its adapters into new tensors, so APSV's in-place perturbation leaves this graph
        intact in float32 too), else without (APQ's prototypes, a detached APSV ascent)."""
        cfg = self.config
        if cfg.loss_support_unperturbed:
            with self.autocast():
                return self.backbone(xs)
        if cfg.adversarial_queries or (cfg.perturbed_adapters and cfg.apsv_detach_support):
            with torch.no_grad(), self.autocast():
                return self.backbone(xs)
        return None

    def loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, x_adv: Tensor | None,
             n_way: int, support: Tensor | None = None) -> tuple[Tensor, StepMetrics]:
        """CE on the clean queries (+ lambda_adv * mean KL with attacked queries), one forward
        pass over the support (unless its embeddings are given), queries and attacked queries
        together."""
        inputs = [xq] if x_adv is None else [xq, x_adv]
        if support is None:
            inputs.insert(0, xs)
        with self.autocast():
            embeddings = self.backbone(torch.cat(inputs))
        parts = list(embeddings.split([len(x) for x in inputs]))
        if support is None:
            support = parts.pop(0)
        protos = prototypes(support.float(), ys, n_way)
        logits = [self.head(q, protos) for q in parts]
        ce = F.cross_entropy(logits[0], yq)
        acc = _accuracy(logits[0], yq)
        if x_adv is None:
            return ce, StepMetrics(ce.item(), ce.item(), acc)
        kl = kl_divergence(logits[1], logits[0], self.config.kl_direction).mean()
        loss = ce + self.config.lambda_adv * kl
        return loss, StepMetrics(loss.item(), ce.item(), acc, kl.item(),
                                 _accuracy(logits[1], yq))

    def adversarial_queries(self, ys: Tensor, xq: Tensor, n_way: int, index: int,
                            support: Tensor) -> Tensor:
        """APQ against prototypes of the clean support at the unperturbed weights."""
        protos = prototypes(support.detach().float(), ys, n_way)

        def logits(x: Tensor) -> Tensor:
            with self.autocast():
                return self.head(self.backbone(x), protos)

        generator = torch.Generator(self.device).manual_seed(episode_seed(self.config.seed,
                                                                          index))
        cfg = self.config
        with self._frozen():
            budget = cfg.episode_budget(index)
            return kl_query_attack(logits, xq, budget, cfg.alpha(budget), cfg.attack_steps,
                                   cfg.kl_direction, cfg.attack_random_start, generator)

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
                         x_adv: Tensor | None, n_way: int, support: Tensor | None
                         ) -> list[tuple[Tensor, Tensor]]:
        """APSV: one ascent direction of the training loss, rescaled per unit (apsv_rescale) to
        the unit's norm (AWP's proxy step, whose learning rate cancels in the rescaling), added
        times awp_gamma. The ascent's support embeddings are ``support`` detached
        (apsv_detach_support, the release), else the loss's own. One extra forward-backward.
        ``apsv_space`` says what is perturbed: the factors A and B (the release), or each
        layer's weight W = W_res + blockdiag(B_j A_j), through its residual buffer, along
        dL/dW and rescaled to the norm of the adapters' delta B A (``_steps``).
        Returns (tensor, its unperturbed value) pairs."""
        cfg = self.config
        if cfg.apsv_detach_support:
            support = support.detach()
        elif not cfg.loss_support_unperturbed:
            support = None  # embedded with the queries, with its graph
        weight_space = cfg.apsv_space == "weight"
        layers = list(lora_layers(self.backbone.vit).values())
        tensors = [layer.residual for layer in layers] if weight_space else \
            [t for unit in self._rescaling_units() for t in unit]
        with _requiring_grad(tensors if weight_space else []):
            loss, _ = self.loss(xs, ys, xq, yq, x_adv, n_way, support)
            # the final loss reuses an attached support's graph
            grads = torch.autograd.grad(loss, tensors, retain_graph=support is not None and
                                        support.requires_grad)
        saved = [(t, t.detach().clone()) for t in tensors]
        with torch.no_grad():
            for targets, directions, references in self._steps(layers, grads):
                scale = _norm(references) / (_norm(directions) + _AWP_EPS)
                for t, d in zip(targets, directions, strict=True):
                    t.add_(d * scale, alpha=cfg.awp_gamma)
        return saved

    def _steps(self, layers: list[LoRALinear], grads: Sequence[Tensor]
               ) -> list[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """APSV's units as (tensors perturbed, their ascent directions, the tensors whose norm
        the step takes). Factors: each unit of ``_rescaling_units``, rescaled to its own norm.
        Weight space: a layer's residual along dL/dW, rescaled to the norm of its adapters'
        delta B A: one unit per layer ('layer': the fused q/k/v blocks together, as the
        factors' unit) or per output block ('block')."""
        if self.config.apsv_space == "factors":
            units, found = self._rescaling_units(), iter(grads)
            return [(unit, [next(found) for _ in unit], unit) for unit in units]
        steps = []
        for layer, grad in zip(layers, grads, strict=True):
            parts = (layer.residual, grad, adapter_delta(layer))
            if self.config.apsv_rescale == "block":
                steps += [([r], [g], [d]) for r, g, d in
                          zip(*(t.split(layer.rows) for t in parts), strict=True)]
            else:
                steps.append(tuple([t] for t in parts))
        return steps

    def _rescaling_units(self) -> list[list[nn.Parameter]]:
        """APSV's units: each adapter tensor ('block'), or a layer's A and its B over all its
        output blocks ('layer': the release's fused qkv lora_A [3r, in] and lora_B [3 out, r]
        are one tensor each, rescaled by one norm, adsv.py:85-99)."""
        if self.config.apsv_rescale == "block":
            return [[t] for pair in adapter_parameters(self.backbone.vit).values() for t in pair]
        return [list(part) for layer in lora_layers(self.backbone.vit).values()
                for part in (layer.lora_A, layer.lora_B)]

    @staticmethod
    def _restore(saved: list[tuple[Tensor, Tensor]] | None) -> None:
        if saved is None:
            return
        with torch.no_grad():
            for t, original in saved:
                t.copy_(original)

    @torch.no_grad()
    def accuracy(self, episode: Sequence[Tensor]) -> float:
        """Clean ProtoNet query accuracy of the model as it is, on one episode."""
        xs, ys, xq, yq = (t.to(self.device, non_blocking=True) for t in episode)
        with self.autocast():
            embeddings = self.backbone(torch.cat([xs, xq]))
        support, query = embeddings.split([len(xs), len(xq)])
        protos = prototypes(support.float(), ys, int(ys.max()) + 1)
        return _accuracy(self.head(query, protos), yq)

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_trainable_state(self, state: dict[str, Tensor], source: Path | str) -> None:
        if set(state) != set(self.params):
            missing, extra = set(self.params) - set(state), set(state) - set(self.params)
            raise CheckpointError(f"{source}: trainable tensors differ: missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def model_file(self, backbone_sha256: str | None, kept_epoch: int | None = None,
                   validation: Sequence[dict] = ()) -> dict:
        """The finished model: pm and styleadv the full backbone, lora/amt the adapters only;
        the head; which epoch's weights these are and every epoch's validation accuracies."""
        cfg = self.config
        content = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
                   "method": cfg.method, "backbone": cfg.backbone, "image_size": cfg.image_size,
                   "pos_embed": cfg.pos_embed, "backbone_checkpoint": cfg.backbone_checkpoint,
                   "backbone_sha256": backbone_sha256, "config": asdict(cfg),
                   "kept_epoch": cfg.epochs if kept_epoch is None else kept_epoch,
                   "validation": list(validation), "head": cpu_state(self.head.state_dict())}
        if cfg.method in FULL_BACKBONE_TRAINERS:
            content["backbone_state"] = cpu_state(self.backbone.vit.state_dict())
        else:
            content.update(lora=cpu_state(get_state(self.backbone.vit).to_tensors()), rank=cfg.rank,
                           targets=list(cfg.targets), residual=RESIDUAL_OF_INIT[cfg.lora_init])
        return content


@contextlib.contextmanager
def _requiring_grad(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Frozen tensors (LoRA residual buffers) made to require grad for one backward."""
    for t in tensors:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in tensors:
            t.requires_grad_(False)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    """The Frobenius norm of the tensors taken together."""
    return torch.stack([t.norm() for t in tensors]).norm()


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


def validate(tuner: MetaTuner, sets: Mapping[str, Dataset], workers: int) -> dict[str, float]:
    """{'acc': the mean over domains, 'acc_<domain>': each domain's mean over its episodes} of
    the clean ProtoNet accuracy of the model being trained (the release's validation score,
    engine.py:120-133, 166-173). In eval mode and from stored episodes with the deterministic
    test transform; nothing draws from the global RNGs (the loader has a generator of its own,
    eval mode no drop path), so validating leaves the training run unchanged."""
    tuner.backbone.eval()
    try:
        per_domain = {}
        for domain, dataset in sets.items():
            loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                pin_memory=tuner.device.type == "cuda",
                                generator=torch.Generator().manual_seed(0))
            per_domain[domain] = float(np.mean([tuner.accuracy(e) for e in loader]))
    finally:
        tuner.backbone.train()
    return {"acc": float(np.mean(list(per_domain.values()))),
            **{f"acc_{domain}": acc for domain, acc in per_domain.items()}}


class Validation:
    """Validation after every epoch (and before the first, as epoch 0) on stored episodes, its
    log, and with keep='best' the best epoch's trainable tensors. The first epoch with the
    highest score is the best (the release's strict improvement, main.py:187-191; its score
    before training only seeds the comparison there, and is recorded, not kept, here)."""

    def __init__(self, sets: Mapping[str, Dataset], config: TrainConfig, path: Path) -> None:
        if config.keep == "best" and not sets:
            raise UserError("keep='best' needs validation episodes (--valid-stores and "
                            "--valid-episodes)")
        self.sets, self.config, self.path = dict(sets), config, path
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "acc", "trainable"}
        self.seconds = 0.0

    def __call__(self, tuner: MetaTuner, epoch: int) -> None:
        if not self.sets:
            return
        tick = time.perf_counter()
        row = {"epoch": epoch, "episode": epoch * self.config.episodes_per_epoch,
               **validate(tuner, self.sets, self.config.workers)}
        self.history.append(row)
        if self.config.keep == "best" and epoch > 0 and \
                (self.best is None or row["acc"] > self.best["acc"]):
            self.best = {"epoch": epoch, "acc": row["acc"],
                         "trainable": cpu_state(tuner.trainable_state())}
        self.seconds += time.perf_counter() - tick
        log.info("epoch %d validation accuracy %.4f (%s), %.1fs", epoch, row["acc"],
                 ", ".join(f"{k[4:]} {v:.4f}" for k, v in row.items() if k.startswith("acc_")),
                 time.perf_counter() - tick)
        self.write()

    @property
    def kept_epoch(self) -> int:
        """The epoch whose weights the run writes (so far): the best, or the last."""
        return self.best["epoch"] if self.best is not None else self.config.epochs

    def state(self) -> dict:
        return {"history": self.history, "best": self.best, "seconds": self.seconds}

    def load(self, state: dict) -> None:
        self.history, self.best, self.seconds = state["history"], state["best"], state["seconds"]

    def write(self) -> None:
        """valid_log.csv, rewritten whole: epoch, episode, acc, kept, then acc_<domain>."""
        columns = ["epoch", "episode", "acc", "kept", *(f"acc_{d}" for d in self.sets)]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for row in self.history:
                writer.writerow({**row, "kept": int(row["epoch"] == self.kept_epoch)})
        tmp.replace(self.path)


def _resume(tuner: MetaTuner, config: TrainConfig, path: Path, backbone_sha: str | None
            ) -> tuple[int, dict | None, dict | None]:
    """Load ``path`` if present: returns (episodes done, RNG states to restore, validation
    state)."""
    if not path.exists():
        return 0, None, None
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
    return ckpt["episode"], ckpt["rng"], ckpt["validation"]


def _save_checkpoint(tuner: MetaTuner, done: int, path: Path, backbone_sha: str | None,
                     validation: Validation) -> None:
    save_atomic({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                 "episode": done, "config": asdict(tuner.config),
                 "backbone_sha256": backbone_sha, "trainable": tuner.trainable_state(),
                 "optimizer": tuner.optimizer.state_dict(), "rng": rng_state(),
                 "validation": validation.state()}, path)


def train(config: TrainConfig, episodes: Dataset, out_dir: Path,
          validation_sets: Mapping[str, Dataset] | None = None) -> Path:
    """Meta-tune on ``episodes[i]`` = (xs, ys, xq, yq) for i < config.total_episodes, validating
    after every epoch on ``validation_sets`` (domain -> stored episodes); writes model.pt (the
    kept epoch's weights), train_log.csv, valid_log.csv and manifest.json into ``out_dir`` and
    returns model.pt's path.

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
    validation = Validation(validation_sets or {}, config, out_dir / VALID_LOG)
    backbone_sha = _backbone_sha(config)
    device = devices.pick_device(config.device)
    devices.reset_peak_memory(device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    tuner = make_tuner(config, device, episodes)
    start, rng, validated = _resume(tuner, config, out_dir / CHECKPOINT, backbone_sha)
    loader = DataLoader(episodes, batch_size=None, sampler=range(start, total),
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    if rng is not None:
        restore_rng(rng)  # after the loader, whose own generator leaves the global one alone
    if validated is not None:
        validation.load(validated)
    log.info("%s on %s, %s: episodes %d..%d of %d, %d trainable tensors", config.method,
             config.backbone, devices.describe(device), start, total - 1, total,
             len(tuner.params))
    if start == 0:
        validation(tuner, 0)
    train_log = TrainLog(out_dir / LOG, start)
    try:
        _run(tuner, loader, range(start, total), train_log, out_dir / CHECKPOINT, backbone_sha,
             validation)
    finally:
        train_log.close()
    if validation.best is not None:
        tuner.load_trainable_state(validation.best["trainable"],
                                   f"the best epoch ({validation.kept_epoch})")
    validation.write()
    model_path = out_dir / MODEL
    save_atomic(tuner.model_file(backbone_sha, validation.kept_epoch, validation.history),
                model_path)
    _write_manifest(tuner, out_dir, start, time.perf_counter() - started, train_log.seconds,
                    backbone_sha, validation)
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    return model_path


def make_tuner(config: TrainConfig, device: torch.device, episodes: Dataset) -> MetaTuner:
    """The method's tuner; styleadv's global classifier spans the episodes' classes
    (``amt.styleadv.GlobalClassEpisodes``)."""
    if config.method != "styleadv":
        return MetaTuner(config, device)
    from amt.styleadv import StyleAdvTuner  # it builds on this module

    if not hasattr(episodes, "num_classes"):
        raise UserError("styleadv trains a global classifier: its episodes must carry their "
                        "classes' global labels (amt.styleadv.GlobalClassEpisodes)")
    return StyleAdvTuner(config, device, episodes.num_classes)


def _backbone_sha(config: TrainConfig) -> str | None:
    if config.backbone_checkpoint is None:
        if config.method not in FULL_BACKBONE_TRAINERS:
            raise ValueError(f"method {config.method!r} needs backbone_checkpoint: the adapters "
                             "are only meaningful on the backbone file they were trained on")
        log.warning("pm from a randomly initialised %s", config.backbone)
        return None
    path = Path(config.backbone_checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; the official file is published at "
                              f"{backbone_entry(config.backbone).published}")
    return sha256(path)


def _run(tuner: MetaTuner, loader: DataLoader, indices: range, train_log: TrainLog,
         checkpoint: Path, backbone_sha: str | None, validation: Validation) -> None:
    cfg, total = tuner.config, indices.stop
    tick = time.perf_counter()
    for index, episode in zip(indices, loader, strict=True):
        lr = episode_lr(cfg, index)
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
        if done % cfg.episodes_per_epoch == 0:
            validation(tuner, done // cfg.episodes_per_epoch)
        if done % cfg.checkpoint_every == 0 and done < total:
            train_log.flush()
            _save_checkpoint(tuner, done, checkpoint, backbone_sha, validation)
        tick = time.perf_counter()


def _write_manifest(tuner: MetaTuner, out_dir: Path, start: int, wall: float,
                    train_seconds: float, backbone_sha: str | None,
                    validation: Validation) -> None:
    cfg = tuner.config
    write_json_atomic({
        "command": "train", "config": asdict(cfg), "seed": cfg.seed,
        "environment": environment(), "device": devices.describe(tuner.device),
        "episodes": cfg.total_episodes, "resumed_from_episode": start,
        "wall_seconds": round(wall, 2), "episode_seconds_total": round(train_seconds, 2),
        "validation_seconds_total": round(validation.seconds, 2),
        "kept_epoch": validation.kept_epoch, "validation": validation.history,
        "peak_memory": devices.peak_memory(tuner.device),
        "trainable_parameters": sum(p.numel() for p in tuner.params.values()),
        "backbone_sha256": backbone_sha, "outputs": [MODEL, LOG, VALID_LOG, MANIFEST],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }, out_dir / MANIFEST)


# -- command line ---------------------------------------------------------------------------------
_FLAGS = {  # option -> (TrainConfig field, type, help); --spec gives the rest
    "--method": ("method", str, f"one of {list(TRAINERS)}"),
    "--backbone": ("backbone", str, "a registry backbone"),
    "--backbone-checkpoint": ("backbone_checkpoint", str, "the backbone's weights file"),
    "--seed": ("seed", int, "run seed (episodes come from the dataset's own seed)"),
    "--epochs": ("epochs", int, None),
    "--episodes-per-epoch": ("episodes_per_epoch", int, None),
    "--optimizer": ("optimizer", str, "sgd or adamw"),
    "--lr": ("lr", float, "base learning rate"),
    "--momentum": ("momentum", float, "SGD's momentum"),
    "--weight-decay": ("weight_decay", float, None),
    "--schedule": ("schedule", str, "cosine_episode, cosine_epoch_timm or "
                   "cosine_epoch_timm_after"),
    "--warmup-epochs": ("warmup_epochs", int, None),
    "--keep": ("keep", str, "the epoch written: best (validation accuracy) or last"),
    "--image-size": ("image_size", int, "input size (default: the backbone's)"),
    "--rank": ("rank", int, "LoRA rank"),
    "--attack-steps": ("attack_steps", int, None),
    "--attack-alpha": ("attack_alpha", str, "step size (default budget/4)"),
    "--awp-gamma": ("awp_gamma", float, "APSV's relative perturbation size"),
    "--apsv-rescale": ("apsv_rescale", str, "layer or block: APSV's norm unit"),
    "--apsv-loss-support": ("apsv_loss_support", str, "unperturbed or perturbed: the weights "
                            "the final loss embeds the support with"),
    "--lambda-adv": ("lambda_adv", float, "weight of the KL term"),
    "--kl-direction": ("kl_direction", str, "clean_adv or adv_clean"),
    "--workers": ("workers", int, "DataLoader worker processes"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--checkpoint-every": ("checkpoint_every", int, "episodes between checkpoints"),
    "--log-every": ("log_every", int, "episodes between progress lines"),
}
_SWITCHES = {"--apq": "apq", "--apsv": "apsv", "--attack-random-start": "attack_random_start",
             "--apsv-detach-support": "apsv_detach_support", "--amp": "amp"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser("train", help="meta-tune a backbone (pm, lora, amt or "
                               "styleadv)")
    add_spec_argument(p, TrainConfig)
    p.add_argument("--stores", type=Path, nargs="+", required=True, help="HDF5 domain files")
    p.add_argument("--split", default="train")
    p.add_argument("--valid-stores", type=Path, nargs="*", default=[],
                   help="HDF5 files of the validation domains, one per --valid-episodes file")
    p.add_argument("--valid-episodes", type=Path, nargs="*", default=[],
                   help="stored validation episodes, validated on after every epoch")
    p.add_argument("--out", type=Path, required=True)
    for option, (key, kind, text) in _FLAGS.items():
        p.add_argument(option, dest=key, type=kind, help=text)
    for option, key in _SWITCHES.items():
        p.add_argument(option, dest=key, action=argparse.BooleanOptionalAction)
    p.add_argument("--budgets", nargs="+", help="APQ l_inf budgets, e.g. 4/255: one is fixed, "
                   "several are drawn per episode (the 'random' pool)")
    p.add_argument("--setting", type=json.loads, help='JSON, e.g. {"ways": 5, "shots": 1, '
                   '"queries": 15} or {"variable": true}')
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from amt.episode_data import SampledEpisodeDataset
    from amt.episodes import sampler_from_setting
    from amt.styleadv import GlobalClassEpisodes  # styleadv's episodes carry global labels
    from amt.transforms import train_transform
    from data_prep.store import DomainStore

    config = spec_from_args(TrainConfig, args)
    stores = [DomainStore(path) for path in args.stores]
    kind = GlobalClassEpisodes if config.method == "styleadv" else SampledEpisodeDataset
    dataset = kind(stores, args.split, sampler_from_setting(config.setting),
                   train_transform(config.image_size), seed=config.seed,
                   length=config.total_episodes)
    validation = validation_sets(args.valid_stores, args.valid_episodes, config)
    train(config, dataset, args.out, validation)
    return 0


def validation_sets(stores: Sequence[Path], files: Sequence[Path], config: TrainConfig
                    ) -> dict[str, Dataset]:
    """Domain (as its episode file names it) -> its stored validation episodes, read with the
    evaluation's deterministic test transform at the run's image size."""
    from amt.episode_data import EpisodeDataset
    from amt.episode_files import check_episodes_fit, check_episodes_match, load_episodes
    from amt.transforms import default_resize, test_transform
    from data_prep.store import DomainStore

    if len(stores) != len(files):
        raise UserError(f"--valid-stores gives {len(stores)} files and --valid-episodes "
                        f"{len(files)}: expected one store per episode file")
    transform = test_transform(config.image_size, default_resize(config.image_size))
    sets: dict[str, Dataset] = {}
    for store_path, file in zip(stores, files, strict=True):
        store = DomainStore(store_path)
        episodes, meta = load_episodes(file)
        check_episodes_match(store, meta)
        check_episodes_fit(store, episodes, meta, file)
        if meta["domain"] in sets:
            raise UserError(f"{file}: a second validation file of domain {meta['domain']!r}")
        sets[meta["domain"]] = EpisodeDataset(store, episodes, transform, config.seed)
    return sets
