"""The LoRA pool artefact."""

from __future__ import annotations

import argparse

import pytest
import torch
from builders import backbone_file, make_pool, model_file

from amt.checkpoints import CheckpointError, load_tagged, sha256
from amt.lora import adapter_parameters, lora_layers, merge
from amt.models import load_trained
from amt.pool import POOL_FORMAT, assemble_pool, load_pool, register
from amt.specs import PoolConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# -- tests ----------------------------------------------------------------------------------------
def test_pool_holds_every_member_once_with_one_backbone_reference(tmp_path):
    backbone = backbone_file(tmp_path)
    files = [model_file(tmp_path, backbone, f"m{p}", budget=(p + 1) / 255, seed=p)
             for p in range(3)]
    files.append(model_file(tmp_path, backbone, "plain", method="lora", seed=7))
    out = assemble_pool(PoolConfig(files, tmp_path / "pool.pt", "separate"))
    stored = load_tagged(out, POOL_FORMAT)  # weights_only=True inside
    assert stored["backbone_sha256"] == sha256(backbone)
    # what each member trained with: one budget each, none for the plain lora member
    assert [m["budgets"] for m in stored["members"]] == [[pytest.approx(b / 255)]
                                                         for b in (1, 2, 3)] + [[]]
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
        assemble_pool(PoolConfig([first, other_rank], tmp_path / "pool.pt", "separate"))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    foreign = model_file(other_dir, backbone_file(other_dir, seed=1), "foreign")
    with pytest.raises(CheckpointError, match="backbone_sha256"):
        assemble_pool(PoolConfig([first, foreign], tmp_path / "pool.pt", "separate"))
    pm = model_file(tmp_path, backbone, "pm", method="pm")
    with pytest.raises(CheckpointError, match=r"pm\.pt: a 'pm' model file"):
        assemble_pool(PoolConfig([first, pm], tmp_path / "pool.pt", "separate"))
    with pytest.raises(ValueError, match="more than once"):
        PoolConfig([first, first], tmp_path / "pool.pt", "separate")
    with pytest.raises(ValueError, match="strategy='mixed'"):
        PoolConfig([first], tmp_path / "pool.pt", "mixed")


def test_model_and_pool_files_rebuild_the_position_embeddings_they_trained_with(tmp_path):
    """Members trained at 48 px on a 32 px (4 x 4 grid) backbone file with the grid kept and
    interpolated: model and pool files record it and are rebuilt the same way; members of
    the two modes do not share a pool."""
    backbone = backbone_file(tmp_path)
    files = [model_file(tmp_path, backbone, f"m{p}", seed=p, image_size=48,
                        pos_embed="interpolate") for p in range(2)]
    x = torch.rand(2, 3, 48, 48)
    rebuilt, _ = load_trained(files[0])
    assert rebuilt.vit.pos_embed.shape == (1, 17, 32)  # the file's grid, kept
    pool = load_pool(assemble_pool(PoolConfig(files, tmp_path / "pool.pt", "separate")))
    assert pool.info["pos_embed"] == "interpolate"
    assert load_tagged(tmp_path / "pool.pt", POOL_FORMAT)["pos_embed"] == "interpolate"
    assert torch.equal(pool.backbone.vit.pos_embed, rebuilt.vit.pos_embed)
    merge(rebuilt.vit)  # member 0 alone, as its own model file gives it
    merge(pool.backbone.vit, [pool.members[0]])
    with torch.no_grad():
        torch.testing.assert_close(pool.backbone(x), rebuilt.eval()(x))
    resampled = model_file(tmp_path, backbone, "resampled", image_size=48)
    assert load_trained(resampled)[0].vit.pos_embed.shape == (1, 37, 32)
    with pytest.raises(CheckpointError, match=r"'pos_embed': \('interpolate', 'resample'\)"):
        assemble_pool(PoolConfig([files[0], resampled], tmp_path / "mixed.pt", "separate"))


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
    pools = [assemble_pool(PoolConfig(members, tmp_path / f"pool{i}.pt", "separate"))
             for i in range(2)]
    assert pools[0].read_bytes() == pools[1].read_bytes()


def test_a_standard_init_pool_is_rebuilt_on_the_unchanged_weight(tmp_path):
    """amt_standard_init's members trained on W_res = W: the pool says so and loads it so."""
    backbone = backbone_file(tmp_path)
    files = [model_file(tmp_path, backbone, f"m{p}", seed=p, lora_init="standard")
             for p in range(2)]
    out = assemble_pool(PoolConfig(files, tmp_path / "pool.pt", "separate"))
    assert load_tagged(out, POOL_FORMAT)["residual"] == "stored"
    weights = torch.load(backbone, weights_only=True)
    pool = load_pool(out)
    for name, layer in lora_layers(pool.backbone.vit).items():
        assert torch.equal(layer.residual, weights[f"{name}.weight"])
    svd = model_file(tmp_path, backbone, "svd")
    with pytest.raises(CheckpointError, match="different residuals"):
        assemble_pool(PoolConfig([files[0], svd], tmp_path / "mixed.pt", "separate"))
