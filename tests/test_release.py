"""Importing the authors' released AMT checkpoints (amt/release.py), on synthetic checkpoints in
the release's layout: the merge, the embeddings and logits, main.py's extra contents, and
files the import must refuse."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from builders import backbone_file, release_state
from PIL import Image
from timm.scheduler import create_scheduler_v2

from amt.__main__ import main
from amt.checkpoints import MODEL_FORMAT, CheckpointError, load_file, load_tagged
from amt.lora import lora_layers
from amt.methods import Merge, PoolMethod
from amt.pool import POOL_FORMAT, load_pool
from amt.registry import IMAGENET_MEAN, IMAGENET_STD
from amt.release import import_release
from amt.specs import Hyper, ImportConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).parents[1]
PREFIX = "backbone.model."
CHOSEN = Merge((2, 0), (0.7, 0.3))  # experts 2 and 0, as TTM's top 2 with these weights


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[dict[str, torch.Tensor], pathlib.Path]:
    """A ViT-S/16 checkpoint in the release's layout (4 experts of rank 8) and its pool,
    imported at 224 px (the file's 14x14 grid, so no position embedding is resampled)."""
    folder = tmp_path_factory.mktemp("release")
    state = release_state()
    torch.save({"model": state}, folder / "release.pth")
    pool = import_release(ImportConfig(folder / "release.pth", folder / "pool.pt",
                                       image_size=224))
    return state, pool


def release_merge(state: dict[str, torch.Tensor], layer: str, plan: Merge) -> torch.Tensor:
    """The release's merged weight, written from its formula (AMT: layers_merge.py:379-392,
    506-527): weight + sum_p w_p merge_AB(A_p, B_p) * scaling, scaling alpha / r = 1; for the
    fused qkv merge_AB is the grouped conv1d of A [3r, in] with B [3 out, r], groups 3."""
    key = f"{PREFIX}{layer}"
    weight = state[f"{key}.weight"].clone()
    for p, w in zip(plan.members, plan.weights, strict=True):
        a, b = state[f"{key}.lora_A.{p}"], state[f"{key}.lora_B.{p}"]
        delta = F.conv1d(a.unsqueeze(0), b.unsqueeze(-1), groups=3).squeeze(0) \
            if layer.endswith("qkv") else b @ a
        weight += w * delta * 1.0
    return weight


def _method(pool: pathlib.Path) -> PoolMethod:
    return PoolMethod(load_pool(pool), "amt_release", Hyper(), torch.device("cpu"), False, 0)


def test_the_merged_layers_equal_the_release_formula(release):
    state, pool = release
    method = _method(pool)
    for plan in (Merge((3,), (1.0,)), CHOSEN):  # one expert alone (TTM's scoring), and a merge
        with method.setup(torch.zeros(0), torch.zeros(0), 0, plan=plan) as head:
            layers = lora_layers(method.backbone.vit)
            assert len(layers) == 48  # 12 blocks x qkv, proj, fc1, fc2
            for name, layer in layers.items():
                torch.testing.assert_close(layer.weight, release_merge(state, name, plan),
                                           rtol=1e-6, atol=1e-6)
        assert (float(head.scale), float(head.bias)) == (12.5, pytest.approx(0.05))


def test_the_imported_model_embeds_and_classifies_as_the_release_would(release):
    state, pool = release
    direct = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    weights = {k.removeprefix(PREFIX): v for k, v in state.items()
               if k.startswith(PREFIX) and ".lora_" not in k}
    for name in {k.rsplit(".lora_", 1)[0].removeprefix(PREFIX) for k in state if ".lora_" in k}:
        weights[f"{name}.weight"] = release_merge(state, name, CHOSEN)
    direct.load_state_dict(weights)
    direct.eval()
    generator = torch.Generator().manual_seed(0)
    xs, xq = torch.rand(5, 3, 224, 224, generator=generator), torch.rand(3, 3, 224, 224,
                                                                         generator=generator)
    ys = torch.arange(5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        support, queries = direct((xs - mean) / std), direct((xq - mean) / std)
    # the release's head: scale_cls * (cos(query, class mean) + bias)
    expected = 12.5 * (F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).T + 0.05)
    method = _method(pool)
    with method.adapt(xs, ys, 0, queries=xq, plan=CHOSEN) as adapted:
        torch.testing.assert_close(method.embed(xq), queries, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(adapted.clean_logits, expected, rtol=1e-4, atol=1e-4)


def test_the_pool_records_its_stored_residual_backbone_and_the_release(release):
    state, pool = release
    stored = load_tagged(pool, POOL_FORMAT)
    assert (stored["residual"], stored["pos_embed"], stored["rank"]) == ("stored", "resample", 8)
    assert [m["config"]["expert"] for m in stored["members"]] == [0, 1, 2, 3]
    assert len({m["source_sha256"] for m in stored["members"]}) == 1
    backbone = load_tagged(pathlib.Path(stored["backbone_checkpoint"]), MODEL_FORMAT)
    assert backbone["method"] == "release"
    assert backbone["backbone_state"]["pos_embed"].shape == (1, 197, 384)  # kept as published
    assert torch.equal(backbone["backbone_state"]["blocks.3.mlp.fc1.weight"],
                       state[f"{PREFIX}blocks.3.mlp.fc1.weight"])
    lora = stored["members"][1]["lora"]  # qkv group 1 (k): rows r..2r of A, out..2 out of B
    qkv = f"{PREFIX}blocks.0.attn.qkv"
    assert torch.equal(lora["blocks.0.attn.qkv.k.A"], state[f"{qkv}.lora_A.1"][8:16])
    assert torch.equal(lora["blocks.0.attn.qkv.k.B"], state[f"{qkv}.lora_B.1"][384:768])


def _main_py_checkpoint(state: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """What the release's main.py saves (AMT: main.py:171-180): model, optimizer and scheduler
    states, epoch, model_ema (None by default), args and the loss scaler's state as 'scalar'."""
    trainable = [v.clone().requires_grad_() for k, v in state.items() if "lora_" in k][:4]
    optimizer = torch.optim.SGD(trainable, lr=5e-4, momentum=0.9)
    sum(t.sum() for t in trainable).backward()
    optimizer.step()
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=30, warmup_epochs=5,
                                       warmup_lr=1e-6, min_lr=1e-6)
    return {"model": state, "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 29, "model_ema": None,
            "args": args, "scalar": torch.amp.GradScaler("cpu").state_dict()}


def test_a_checkpoint_saved_by_main_py_converts_with_its_args(tmp_path, capsys):
    args = argparse.Namespace(arch="dino_small_patch16_amt", lr=5e-5, base_sources=["ilsvrc_2012"],
                              fp16=True, resume="", aug_prob=0.9)
    file = tmp_path / "metadataset_imagenet_advmetatuned_5w1s.pth"
    torch.save(_main_py_checkpoint(release_state(seed=1), args), file)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(file)  # the Namespace is refused without the import's allow-list
    out = tmp_path / "pool.pt"
    assert main(["import-release", str(file), "--backbone", "dino_vits16", "--out", str(out)]) == 0
    stored = load_tagged(out, POOL_FORMAT)  # plain weights_only: no Namespace left in the pool
    assert stored["members"][0]["config"]["args"] == vars(args)
    assert stored["members"][0]["config"]["epoch"] == 29
    assert stored["backbone_checkpoint"] == str(tmp_path / "pool_backbone.pt")
    pool = load_pool(out)
    assert len(pool) == 4 and pool.info["image_size"] == 128
    assert pool.backbone.vit.pos_embed.shape == (1, 65, 384)  # resampled at load, as today


@pytest.mark.parametrize("payload", ["code", "other class"])
def test_a_file_holding_anything_else_is_refused_without_executing(tmp_path, pickled_code,
                                                                    capsys, payload):
    code, marker = pickled_code
    args = code if payload == "code" else argparse.Namespace(output=pathlib.PurePosixPath("x"))
    file = tmp_path / "release.pth"
    torch.save({"model": release_state("tiny_vit", 32, rank=2), "args": args}, file)
    assert main(["import-release", str(file), "--backbone", "tiny_vit", "--out",
                 str(tmp_path / "pool.pt")]) == 2
    error = capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "pool.pt").exists()
    assert f"error: {file}: refused: it holds non-tensor objects" in error
    assert "tensors, plain containers and argparse.Namespace are loaded" in error
    assert "Traceback" not in error and "weights_only=False" not in error


def _without(key: str):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _renamed(old: str, new: str):
    return lambda s: {(new if k == old else k): v for k, v in s.items()}


def _merged_copy(s: dict) -> dict:
    weight = s[f"{PREFIX}blocks.0.mlp.fc2.weight"]
    return {**s, f"{PREFIX}blocks.0.mlp.fc2.ori_weight": weight + 1}


LAYOUTS = [  # (a change to a good checkpoint, the message)
    ("training checkpoint", _renamed(f"{PREFIX}blocks.0.attn.proj.lora_A.0",
                                     "backbone.blocks.0.attn.proj.lora_A"),
     r"backbone\.blocks\.0\.attn\.proj\.lora_A has no expert index: a training checkpoint"),
    ("an expert missing", _without(f"{PREFIX}blocks.1.mlp.fc1.lora_B.1"),
     r"blocks\.1\.mlp\.fc1 has lora_A only"),
    ("uneven experts", _renamed(f"{PREFIX}blocks.1.mlp.fc1.lora_A.1",
                                f"{PREFIX}blocks.1.mlp.fc1.lora_A.5"),
     r"expected experts 0\.\.P-1 in every adapted layer"),
    ("a stray key", lambda s: {**s, "router.weight": torch.zeros(2)},
     r"keys \['router\.weight'\] are outside backbone\.model\.\*"),
    ("no head", _without("scale_cls"), r"head keys \['scale_cls'\] are missing"),
    ("saved while merged", _merged_copy, r"fc2\.weight: its \.ori_weight differs"),
    ("wrong backbone", _without(f"{PREFIX}norm.weight"),
     r"release\.pth: its ViT is not tiny_vit: keys do not match .* \['norm\.weight'\]"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_a_checkpoint_not_in_the_release_layout_is_refused_naming_the_key(tmp_path, edit, message):
    file = tmp_path / "release.pth"
    torch.save({"model": edit(release_state("tiny_vit", 32, experts=2, rank=2))}, file)
    with pytest.raises(CheckpointError, match=message):
        import_release(ImportConfig(file, tmp_path / "pool.pt", backbone="tiny_vit"))
    assert not (tmp_path / "pool.pt").exists() and not (tmp_path / "pool_backbone.pt").exists()


def test_the_merge_models_copies_of_unmerged_weights_are_dropped(tmp_path):
    state = release_state("tiny_vit", 32, experts=2, rank=2)
    weight = f"{PREFIX}blocks.1.attn.qkv.weight"
    torch.save({"model": {**state, weight.replace(".weight", ".ori_weight"): state[weight]}},
               tmp_path / "release.pth")
    pool = import_release(ImportConfig(tmp_path / "release.pth", tmp_path / "pool.pt",
                                       backbone="tiny_vit"))
    backbone = load_tagged(tmp_path / "pool_backbone.pt", MODEL_FORMAT)["backbone_state"]
    assert not any(k.endswith("ori_weight") for k in backbone)
    assert len(load_pool(pool)) == 2


# -- the workflow ---------------------------------------------------------------------------------
def _image_folder(root: pathlib.Path, classes: int, per_class: int) -> pathlib.Path:
    """Class folders of random 16 px PNGs (each class a template plus noise)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        template = rng.integers(0, 256, (16, 16, 3))
        for i in range(per_class):
            pixels = np.clip(template + rng.normal(0, 30, template.shape), 0, 255)
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _workflow_config(tmp_path: pathlib.Path) -> dict:
    """configs/ci.yaml cut to one image-folder domain (5 train, 5 test classes), a tiny_vit
    backbone file with a synthetic release for 5w1s, pm trained (per training seed) and evaluated
    beside it."""
    config = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    raw = _image_folder(tmp_path / "tiles", classes=10, per_class=6)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [f"class{c}" for c in range(5)],
                                 "test": [f"class{c}" for c in range(5, 10)]}))
    release = tmp_path / "metadataset_imagenet_advmetatuned_5w1s.pth"
    torch.save({"model": release_state("tiny_vit", 32, rank=2), "epoch": 3,
                "args": argparse.Namespace(arch="tiny")}, release)
    config["domains"] = {"tiles": {"source": "image_folder", "raw": str(raw),
                                   "options": {"split_file": str(split)}}}
    config["backbones"] = {"tiny_vit": {"checkpoint": str(backbone_file(tmp_path)),
                                        "release": {"5w1s": str(release)}}}
    config["train"].update(sources=["tiles"], backbones=["tiny_vit"], methods=["pm"],
                           episodes_per_epoch=2, keep="last")
    del config["train"]["amt"], config["train"]["validation"]  # tiles has no valid split
    config["evaluate"].update(
        targets=["tiles"], methods=["pm", "amt_release"], references=["pm"],
        grids={"amt_release": {"beta": [1], "gamma": [0.6],
                               "str": ["none", {"layers": "fc1", "ratio": 0.5}]}})
    return config


def test_the_workflow_imports_and_evaluates_the_release_beside_its_own_methods(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_workflow_config(tmp_path)))
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile",
                          str(config), "-d", str(tmp_path / "run"), "-s", str(ROOT / "Snakefile")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp_path / "run" / "results"
    where = "tiny_vit/5w1s/seed0/tiles/amt_release"  # the release: the first seed only
    rows = pd.read_csv(results / "eval" / f"{where}.csv")
    assert set(rows.attack) >= {"none", "pgd", "contrast"} and set(rows.backbone) == {"tiny_vit"}
    assert (results / "eval" / f"{where}.sanity.json").is_file()
    assert (results / "eval" / f"{where}.spectra.csv").is_file()
    for seed in (0, 1):  # ci.yaml's training seeds
        assert (results / "eval" / f"tiny_vit/5w1s/seed{seed}/tiles/pm.csv").is_file()
    assert not (results / "eval" / "tiny_vit/5w1s/seed1/tiles/amt_release.csv").exists()
    assert json.loads((results / "selection" / f"{where}.json").read_text())
    log = (results / "logs" / "import_release" / "tiny_vit_5w1s.log").read_text()
    assert "4 experts of rank 2 on tiny_vit (epoch 3)" in log
    assert "The authors' released AMT pool" in (results / "tables" / "tables.md").read_text()
