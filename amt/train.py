"""Meta-tuning (pm, lora, amt) with resumable checkpoints.

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
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
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
from amt.lora import adapter_parameters, get_state, inject_lora
from amt.protonet import ProtoHead, prototypes
from amt.registry import TRAINERS, backbone_entry
from amt.schedule import cosine_lr
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
                   "pos_embed": cfg.pos_embed, "backbone_checkpoint": cfg.backbone_checkpoint,
                   "backbone_sha256": backbone_sha256, "config": asdict(cfg),
                   "head": cpu_state(self.head.state_dict())}
        if cfg.method == "pm":
            content["backbone_state"] = cpu_state(self.backbone.vit.state_dict())
        else:
            content.update(lora=cpu_state(get_state(self.backbone.vit).to_tensors()), rank=cfg.rank,
                           targets=list(cfg.targets))
        return content


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


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
                              f"{backbone_entry(config.backbone).published}")
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


# -- command line ---------------------------------------------------------------------------------
_FLAGS = {  # option -> (TrainConfig field, type, help); --spec gives the rest
    "--method": ("method", str, f"one of {list(TRAINERS)}"),
    "--backbone": ("backbone", str, "a registry backbone"),
    "--backbone-checkpoint": ("backbone_checkpoint", str, "the backbone's weights file"),
    "--seed": ("seed", int, "run seed (episodes come from the dataset's own seed)"),
    "--epochs": ("epochs", int, None),
    "--episodes-per-epoch": ("episodes_per_epoch", int, None),
    "--lr": ("lr", float, "base learning rate (SGD, momentum 0.9, cosine)"),
    "--warmup-epochs": ("warmup_epochs", int, None),
    "--image-size": ("image_size", int, "input size (default: the backbone's)"),
    "--rank": ("rank", int, "LoRA rank"),
    "--attack-steps": ("attack_steps", int, None),
    "--attack-alpha": ("attack_alpha", str, "step size (default budget/4)"),
    "--awp-gamma": ("awp_gamma", float, "APSV's relative perturbation size"),
    "--lambda-adv": ("lambda_adv", float, "weight of the KL term"),
    "--kl-direction": ("kl_direction", str, "adv_clean or clean_adv"),
    "--workers": ("workers", int, "DataLoader worker processes"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--checkpoint-every": ("checkpoint_every", int, "episodes between checkpoints"),
    "--log-every": ("log_every", int, "episodes between progress lines"),
}
_SWITCHES = {"--apq": "apq", "--apsv": "apsv", "--attack-random-start": "attack_random_start",
             "--amp": "amp"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser("train", help="meta-tune a backbone (pm, lora or amt)")
    add_spec_argument(p, TrainConfig)
    p.add_argument("--stores", type=Path, nargs="+", required=True, help="HDF5 domain files")
    p.add_argument("--split", default="train")
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
    from amt.transforms import train_transform
    from data_prep.store import DomainStore

    config = spec_from_args(TrainConfig, args)
    stores = [DomainStore(path) for path in args.stores]
    dataset = SampledEpisodeDataset(stores, args.split, sampler_from_setting(config.setting),
                                    train_transform(config.image_size), seed=config.seed,
                                    length=config.total_episodes)
    train(config, dataset, args.out)
    return 0
