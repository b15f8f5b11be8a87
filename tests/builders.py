"""Builders the tests share: small domain files written by the real writer, backbone, model and
pool files as the jobs write them, stored episodes, and synthetic tidy results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from amt.backbones import build_backbone
from amt.checkpoints import save_atomic, sha256
from amt.episode_files import episode_meta, save_episodes
from amt.episodes import FixedSampler, draw_episodes
from amt.lora import adapter_parameters
from amt.pool import assemble_pool
from amt.registry import LORA_TARGETS
from amt.rows import validate_results
from amt.specs import PoolConfig, TrainConfig
from amt.train import MetaTuner
from data_prep.convert import ClassSpec, write_domain
from data_prep.store import DomainStore

RANK = 2
CPU = torch.device("cpu")


# -- domains and episodes -------------------------------------------------------------------------
def split_domain(path: Path, splits: dict[str, int], images_per_class: int | list[int] = 4,
                size: int = 12, superclasses: int = 0, seed: int = 0) -> Path:
    """Write a small greyscale domain with the given number of classes per split."""
    rng = np.random.default_rng(seed)
    names = [(split, i) for split, n in splits.items() for i in range(n)]
    counts = (images_per_class if isinstance(images_per_class, list)
              else [images_per_class] * len(names))
    classes = [
        ClassSpec(
            name=f"{split}_{i}",
            split=split,
            items=[rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(count)],
            superclass=f"group_{c % superclasses}" if superclasses else None,
        )
        for c, ((split, i), count) in enumerate(zip(names, counts, strict=True))
    ]
    write_domain(path, source="synthetic", converter_version="test", classes=classes,
                 load=np.asarray)
    return path


def backbone_file(folder: Path, seed: int = 0) -> Path:
    """A random tiny_vit backbone in the flat (DINO-like) layout."""
    torch.manual_seed(seed)
    path = folder / "tiny_backbone.pth"
    torch.save(build_backbone("tiny_vit", None, 32).vit.state_dict(), path)
    return path


def model_file(folder: Path, backbone: Path, name: str, method: str = "amt",
               budget: float = 4 / 255, seed: int = 0, noise: float = 0.3,
               rank: int = RANK, **config: object) -> Path:
    """A model.pt as ``train`` writes it, with randomly moved adapters and head scale;
    ``config``: other TrainConfig fields."""
    config = TrainConfig(method=method, backbone="tiny_vit", backbone_checkpoint=str(backbone),
                         rank=rank, budgets=[budget], seed=seed, **config)
    torch.manual_seed(seed)
    tuner = MetaTuner(config, CPU)
    with torch.no_grad():
        for a, b in adapter_parameters(tuner.backbone.vit).values():
            a.add_(noise * torch.randn_like(a))
            b.add_(noise * torch.randn_like(b))
        tuner.head.scale.fill_(8.0 + seed)
    path = folder / f"{name}.pt"
    save_atomic(tuner.model_file(sha256(backbone)), path)
    return path


def make_pool(folder: Path, members: int = 3, noise: float = 0.3) -> Path:
    backbone = backbone_file(folder)
    files = [model_file(folder, backbone, f"member{p}", budget=(p + 1) / 255, seed=p,
                        noise=noise) for p in range(members)]
    return assemble_pool(PoolConfig(files, folder / "pool.pt", "separate"))


def release_state(backbone: str = "dino_vits16", image_size: int = 224, experts: int = 4,
                  rank: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A test model's state dict in the layout of the authors' release (ProtoNetMerge over
    vit_small_amt_merge): random ViT weights under backbone.model. (the adapted layers' weight
    playing W_res), ``experts`` random rank-``rank`` adapters per adapted layer as
    lora_A.<i> [groups r, in] / lora_B.<i> [out, r] (qkv: 3 groups), one head."""
    torch.manual_seed(seed)
    vit = build_backbone(backbone, None, image_size).vit
    state = {f"backbone.model.{k}": v for k, v in vit.state_dict().items()}
    for name, module in vit.named_modules():
        if not name.endswith(LORA_TARGETS):
            continue
        out_features, in_features = module.weight.shape
        groups = 3 if name.endswith("qkv") else 1
        for i in range(experts):
            state[f"backbone.model.{name}.lora_A.{i}"] = \
                0.1 * torch.randn(groups * rank, in_features)
            state[f"backbone.model.{name}.lora_B.{i}"] = 0.1 * torch.randn(out_features, rank)
    return {"bias": torch.tensor([0.05]), "scale_cls": torch.tensor([12.5]), **state}


def template_domain(path: Path, classes: int = 5, per_class: int = 6, size: int = 16,
                    seed: int = 0) -> Path:
    """A greyscale domain of test classes: each class a random template, each image its
    template plus noise. A random backbone separates the classes fairly (not perfectly)
    through all its layers, so hyperparameters that damage the features show in the
    accuracy."""
    rng = np.random.default_rng(seed)
    specs = []
    for c in range(classes):
        template = rng.integers(0, 256, (size, size)).astype(float)
        items = [np.clip(template + rng.normal(0, 40, (size, size)), 0, 255).astype(np.uint8)
                 for _ in range(per_class)]
        specs.append(ClassSpec(name=f"class{c}", split="test", items=items))
    write_domain(path, source="synthetic", converter_version="test", classes=specs,
                 load=np.asarray)
    return path


def make_episodes(store_path: Path, out: Path, count: int = 2, ways: int = 5, shots: int = 1,
                  queries: int = 2, seed: int = 0) -> Path:
    store = DomainStore(store_path)
    sampler = FixedSampler(ways=ways, shots=shots, queries=queries)
    episodes = draw_episodes(store, "test", sampler, count, seed)
    meta = episode_meta(store, domain="synthetic", split="test", sampler=sampler, seed=seed,
                        count=count)
    save_episodes(out, episodes, {**meta, "setting_name": f"{ways}w{shots}s"})
    return out


# -- tidy results ------------------------------------------------------------------------------
BENCHMARKS = {"builtin": ["glyphs", "mnist", "digits", "animals"],
              "bscd": ["src", "eurosat", "isic", "chestx"]}
METHODS = {"pm": 0.0, "lora": 0.03, "amt": 0.08, "amt_no_ttm": 0.05, "amt_weight_avg": 0.04,
           "amt_pool_uniform": 0.06, "amt_release": 0.07, "amt_lambda_3": 0.07,
           "amt_lambda_0p5": 0.02, "amt_weight_space": 0.06}
ROBUST = {"pm": 0.2, "lora": 0.3, "amt": 0.8, "amt_no_ttm": 0.7, "amt_weight_avg": 0.6,
          "amt_pool_uniform": 0.75, "amt_release": 0.7, "amt_lambda_3": 0.7,
          "amt_lambda_0p5": 0.4, "amt_weight_space": 0.6}
CONDITIONS = [("none", "none", 0.0), ("pgd", "linf", 2 / 255), ("pgd", "linf", 4 / 255),
              ("gaussian_noise", "corruption", 1.0), ("gaussian_noise", "corruption", 3.0),
              ("contrast", "corruption", 1.0), ("contrast", "corruption", 3.0)]
QUERIES = 75  # 5-way, 15 queries per class: accuracies are multiples of 1/75


def _accuracy(base: float, method: str, condition: tuple, rng: np.random.Generator) -> float:
    attack, norm, eps = condition
    drop = {"none": 0.0, "linf": eps * 255 * 0.1, "corruption": eps * 0.05}[norm]
    mean = base + METHODS[method] - drop * (1 - ROBUST[method])
    return float(np.clip(np.round(rng.normal(mean, 0.08) * QUERIES) / QUERIES, 0, 1))


def synthetic_results(episodes: int = 10, seed: int = 0) -> pd.DataFrame:
    """2 benchmarks x 4 domains (the first in-domain), 10 methods (two of the amt_lambda
    sweep), 2 settings, 7 conditions."""
    rng = np.random.default_rng(seed)
    rows = []
    for benchmark, domains in BENCHMARKS.items():
        for d, domain in enumerate(domains):
            for setting, base in (("5w1s", 0.55), ("5w5s", 0.75)):
                for method in METHODS:
                    for condition in CONDITIONS:
                        for episode in range(episodes):
                            rows.append({
                                "benchmark": benchmark, "domain": domain, "in_domain": d == 0,
                                "backbone": "dino", "method": method, "setting": setting,
                                "episode": episode, "attack": condition[0],
                                "norm": condition[1], "eps": condition[2],
                                "accuracy": _accuracy(base - 0.05 * d, method, condition, rng),
                                "seed": 0, "config_hash": "abc123"})
    return validate_results(pd.DataFrame(rows))


# The paper tables' further rows: method -> (the method whose rows it shifts, the shift)
PAPER_METHODS = {"pmf": ("pm", 0.02), "amt_ft": ("amt", 0.03), "amt_no_str": ("amt", -0.02),
                 "pmf_adv": ("pm", 0.05)}


def paper_results(episodes: int = 10) -> pd.DataFrame:
    """synthetic_results with PAPER_METHODS' rows: fine-tuned methods, an ablation, and
    pmf_adv (adversarial fine-tuning; a test registers it)."""
    base = synthetic_results(episodes)
    extra = [base[base.method == source].assign(method=name,
                                                accuracy=(base.accuracy + shift).clip(0, 1))
             for name, (source, shift) in PAPER_METHODS.items()]
    return validate_results(pd.concat([base, *extra], ignore_index=True))


def synthetic_spectra(layers: int = 3, rank: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for domain in ("mnist", "eurosat"):
        for method, decay in (("amt", 0.7), ("amt_no_str", 0.85), ("pm", 0.9)):
            for layer in range(layers):
                values = np.sort(rng.uniform(0.5, 1.5) * decay ** np.arange(rank))[::-1]
                rows += [{"domain": domain, "method": method, "layer": f"blocks.{layer}.mlp.fc1",
                          "index": i, "singular_value": v} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


# -- synthetic episodes ------------------------------------------------------------------------
def colour_episode(seed: int = 0, ways: int = 3, shots: int = 2, queries: int = 4):
    """One synthetic episode (xs, ys, xq, yq) at 32 px: class k noise around a colour of its own."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(queries)
    colours = torch.linspace(0.2, 0.8, ways)

    def images(labels):
        noise = torch.rand(len(labels), 3, 32, 32, generator=g)
        return (0.6 * colours[labels].view(-1, 1, 1, 1) + 0.4 * noise).clamp(0, 1)

    return images(ys), ys, images(yq), yq


class Killed(Exception):
    """Stands for the process being killed while episode data is loaded."""


class Episodes(Dataset):
    """Synthetic episodes: class k's images are noise around a colour of its own (its weight
    ``colour``: faint colours make classes overlap)."""

    def __init__(self, length: int, ways: int = 3, shots: int = 2, queries: int = 2,
                 size: int = 32, kill_at: int | None = None, nan_at: int | None = None,
                 colour: float = 0.7) -> None:
        self.length, self.ways, self.shots, self.queries, self.size = (length, ways, shots,
                                                                       queries, size)
        self.kill_at, self.nan_at, self.colour = kill_at, nan_at, colour

    def __len__(self) -> int:
        return self.length

    def _images(self, per_class: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(self.ways).repeat_interleave(per_class)
        colours = torch.linspace(0.2, 0.8, self.ways)[labels].view(-1, 1, 1, 1)
        noise = torch.rand(len(labels), 3, self.size, self.size, generator=g)
        return (self.colour * colours + (1 - self.colour) * noise).clamp(0, 1), labels

    def __getitem__(self, i: int):
        if i == self.kill_at:
            raise Killed(f"killed at episode {i}")
        g = torch.Generator().manual_seed(1000 + i)
        xs, ys = self._images(self.shots, g)
        xq, yq = self._images(self.queries, g)
        if i == self.nan_at:
            xq = torch.full_like(xq, float("nan"))
        return xs, ys, xq, yq


def train_config(tiny_file: Path | None, **overrides) -> TrainConfig:
    """A tiny_vit TrainConfig of a few short epochs (tiny_file: its backbone file)."""
    base = dict(backbone="tiny_vit", backbone_checkpoint=str(tiny_file) if tiny_file else None,
                epochs=2, episodes_per_epoch=3, warmup_epochs=1, lr=0.05, rank=2,
                attack_steps=2, checkpoint_every=2, log_every=100)
    return TrainConfig(**{**base, **overrides})
