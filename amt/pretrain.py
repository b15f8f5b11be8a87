"""Supervised pretraining of the built-in backbone on one store's train classes (the built-in
default has no official weights): cross-entropy with a linear layer on the embedding, AdamW,
warm-up + cosine per step. Writes a model file that ``build_backbone`` loads."""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from amt import devices
from amt.backbones import build_backbone, freeze_and_fold_norms
from amt.checkpoints import (
    FORMAT_VERSION,
    LOG,
    MANIFEST,
    MODEL,
    MODEL_FORMAT,
    TrainingError,
    cpu_state,
    environment,
    save_atomic,
    write_json_atomic,
)
from amt.schedule import cosine_lr
from amt.specs import PretrainConfig, add_spec_argument, spec_from_args

log = logging.getLogger(__name__)


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
                 "backbone_state": cpu_state(freeze_and_fold_norms(backbone.vit).state_dict()),
                 "classifier": cpu_state(classifier.state_dict()), "num_classes": num_classes,
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` command."""
    p = subparsers.add_parser("pretrain", help="supervised pretraining of the built-in backbone")
    add_spec_argument(p, PretrainConfig)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", help="a registry backbone (default small_vit)")
    for option in ("--image-size", "--epochs", "--batch-size", "--seed", "--workers"):
        p.add_argument(option, type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from amt.transforms import TrainTransform
    from data_prep.store import DomainStore

    config = spec_from_args(PretrainConfig, args)
    transform = TrainTransform(config.image_size, scale=config.crop_scale, flip_p=config.flip_p)
    dataset = StoreImages(DomainStore(args.store), "train", transform, config.seed)
    pretrain(config, dataset, dataset.num_classes, args.out)
    return 0
