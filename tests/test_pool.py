"""The LoRA pool artefact; also the tiny pools, stores and episode files other tests build on."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from amt.backbones import build_backbone
from amt.checkpoints import CheckpointError, load_tagged, save_atomic, sha256
from amt.episodes import FixedSampler, draw_episodes, episode_meta, save_episodes
from amt.lora import adapter_parameters, lora_layers
from amt.pool import POOL_FORMAT, assemble_pool, load_pool, register
from amt.train import MetaTuner, TrainConfig, load_trained
from data_prep.convert import ClassSpec, write_domain
from data_prep.store import DomainStore

RANK = 2
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and a contended thread pool stalls them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- builders shared with test_adapt, test_evaluate, test_select ----------------------------------
def backbone_file(folder: Path, seed: int = 0) -> Path:
    """A random tiny_vit backbone in the flat (DINO-like) layout."""
    torch.manual_seed(seed)
    path = folder / "tiny_backbone.pth"
    torch.save(build_backbone("tiny_vit", None, 32).vit.state_dict(), path)
    return path


def model_file(folder: Path, backbone: Path, name: str, method: str = "amt",
               budget: float = 4 / 255, seed: int = 0, noise: float = 0.3,
               rank: int = RANK) -> Path:
    """A model.pt as ``train`` writes it, with randomly moved adapters and head scale."""
    config = TrainConfig(method=method, backbone="tiny_vit", backbone_checkpoint=str(backbone),
                         rank=rank, budget=budget, seed=seed)
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
    return assemble_pool(files, folder / "pool.pt", "separate")


def make_domain(path: Path, classes: int = 5, per_class: int = 6, size: int = 16,
                seed: int = 0) -> Path:
    """A greyscale test domain: each class a random template, each image its template plus
    noise. A random backbone separates the classes fairly (not perfectly) through all its
    layers, so hyperparameters that damage the features show in the accuracy."""
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


# -- tests ----------------------------------------------------------------------------------------
def test_pool_holds_every_member_once_with_one_backbone_reference(tmp_path):
    backbone = backbone_file(tmp_path)
    files = [model_file(tmp_path, backbone, f"m{p}", budget=(p + 1) / 255, seed=p)
             for p in range(3)]
    files.append(model_file(tmp_path, backbone, "plain", method="lora", seed=7))
    out = assemble_pool(files, tmp_path / "pool.pt", "separate")
    stored = load_tagged(out, POOL_FORMAT)  # weights_only=True inside
    assert stored["backbone_sha256"] == sha256(backbone)
    assert [m["budget"] for m in stored["members"]] == pytest.approx([1 / 255, 2 / 255, 3 / 255,
                                                                      0.0])
    assert not any(key.endswith(("residual", "weight")) for m in stored["members"]
                   for key in m["lora"])  # adapters only: W_res is rebuilt at load

    pool = load_pool(out)
    assert len(pool) == 4 and pool.strategy == "separate"
    for path, state, head in zip(files, pool.members, pool.heads, strict=True):
        backbone_p, head_p = load_trained(path)
        torch.testing.assert_close(head.scale, head_p.scale, rtol=0, atol=0)
        live = adapter_parameters(backbone_p.vit)
        for name, (a, b) in state.adapters.items():
            assert torch.equal(a, live[name][0]) and torch.equal(b, live[name][1])
    residuals = {n: m.residual for n, m in lora_layers(backbone_p.vit).items()}
    for name, layer in lora_layers(pool.backbone.vit).items():
        assert torch.equal(layer.residual, residuals[name])
    assert not any(p.requires_grad for p in pool.backbone.parameters())


def test_members_must_share_backbone_file_rank_and_kind(tmp_path):
    backbone = backbone_file(tmp_path)
    first = model_file(tmp_path, backbone, "first")
    other_rank = model_file(tmp_path, backbone, "rank3", rank=3)
    with pytest.raises(CheckpointError, match=r"rank3\.pt: differs .*'rank': \(2, 3\)"):
        assemble_pool([first, other_rank], tmp_path / "pool.pt", "separate")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    foreign = model_file(other_dir, backbone_file(other_dir, seed=1), "foreign")
    with pytest.raises(CheckpointError, match="backbone_sha256"):
        assemble_pool([first, foreign], tmp_path / "pool.pt", "separate")
    pm = model_file(tmp_path, backbone, "pm", method="pm")
    with pytest.raises(CheckpointError, match=r"pm\.pt: a 'pm' model file"):
        assemble_pool([first, pm], tmp_path / "pool.pt", "separate")
    with pytest.raises(ValueError, match="more than once"):
        assemble_pool([first, first], tmp_path / "pool.pt", "separate")
    with pytest.raises(ValueError, match="strategy 'mixed'"):
        assemble_pool([first], tmp_path / "pool.pt", "mixed")


def test_load_refuses_a_changed_backbone_file(tmp_path):
    pool = make_pool(tmp_path, members=2)
    changed = tmp_path / "changed.pth"
    changed.write_bytes(b"x" + (tmp_path / "tiny_backbone.pth").read_bytes())
    with pytest.raises(CheckpointError, match="differs"):
        load_pool(pool, backbone_checkpoint=changed)


def test_pool_command(tmp_path):
    backbone = backbone_file(tmp_path)
    files = [model_file(tmp_path, backbone, f"m{p}", seed=p) for p in range(2)]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["pool", "--members", *map(str, files), "--strategy", "uniform",
                              "--out", str(tmp_path / "p.pt")])
    assert args.func(args) == 0
    assert load_tagged(tmp_path / "p.pt", POOL_FORMAT)["strategy"] == "uniform"


def test_pool_files_of_the_same_members_are_byte_identical(tmp_path):
    backbone = backbone_file(tmp_path)
    members = [model_file(tmp_path, backbone, f"m{p}", seed=p) for p in range(2)]
    pools = [assemble_pool(members, tmp_path / f"pool{i}.pt", "separate") for i in range(2)]
    assert pools[0].read_bytes() == pools[1].read_bytes()
