import dataclasses
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from amt.backbones import (
    Backbone,
    MaxPool2x2,
    build_backbone,
    freeze_and_fold_norms,
    remap_deit,
    remap_dino,
    remap_ibot,
)
from amt.checkpoints import CheckpointError
from amt.registry import BACKBONES


@pytest.fixture
def tiny_state():
    torch.manual_seed(0)
    return build_backbone("tiny_vit", None, 32).vit.state_dict()


@pytest.fixture
def tiny_family(monkeypatch):
    """Register tiny_vit under each checkpoint family, so official layouts load in
    milliseconds."""
    for family in ("dino", "ibot", "deit"):
        monkeypatch.setitem(BACKBONES, f"tiny_{family}",
                            dataclasses.replace(BACKBONES["tiny_vit"], name=f"tiny_{family}",
                                                family=family))


def _head(state):
    return {"head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}


def _layouts(state):
    """The same weights in each official file layout."""
    return {
        "dino": dict(state),
        "deit": {"model": {**state, **_head(state)}},
        "ibot": {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}
                 | {"module.head.mlp.0.weight": torch.randn(4, 32)}},
        "ibot_state_dict": {"state_dict": {f"backbone.{k}": v for k, v in state.items()}},
    }


@pytest.mark.parametrize("layout", ["dino", "deit", "ibot", "ibot_state_dict"])
def test_family_layouts_remap_to_the_same_tensors(tiny_state, layout):
    remap = {"dino": remap_dino, "deit": remap_deit}.get(layout, remap_ibot)
    remapped = remap(_layouts(tiny_state)[layout], Path("x.pth"))
    assert list(remapped) == list(tiny_state)
    assert all(torch.equal(remapped[k], v) for k, v in tiny_state.items())


def test_wrong_nesting_names_the_file_and_keys(tiny_state):
    with pytest.raises(CheckpointError, match="x.pth: expected the state dict under 'model'.*"
                                              "keys \\['cls_token'"):
        remap_deit(tiny_state, Path("x.pth"))
    with pytest.raises(CheckpointError, match="'teacher' or 'state_dict'"):
        remap_ibot({"student": {}}, Path("x.pth"))


@pytest.mark.parametrize("family", ["dino", "deit", "ibot"])
def test_build_from_each_layout_with_resampled_pos_embed(tmp_path, tiny_state, tiny_family,
                                                         family):
    path = tmp_path / f"{family}.pth"
    torch.save(_layouts(tiny_state)[family], path)
    backbone = build_backbone(f"tiny_{family}", path, 48)  # 4x4 grid in the file, 6x6 here
    expected = resample_abs_pos_embed(tiny_state["pos_embed"], new_size=[6, 6],
                                      num_prefix_tokens=1)
    assert torch.equal(backbone.vit.pos_embed, expected)
    blocks = backbone.vit.blocks[1].mlp.fc2.weight
    assert torch.equal(blocks, tiny_state["blocks.1.mlp.fc2.weight"])
    assert backbone(torch.rand(2, 3, 48, 48)).shape == (2, 32)


@pytest.fixture(scope="module")
def dino_224(tmp_path_factory) -> Path:
    """A ViT-S/16 file in DINO's layout with its 14 x 14 grid (197 position embeddings)."""
    torch.manual_seed(0)
    state = build_backbone("dino_vits16", None, 224).vit.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])  # a non-smooth field
    path = tmp_path_factory.mktemp("dino") / "dino.pth"
    torch.save(state, path)
    return path


def test_interpolated_pos_embed_is_dinos_on_every_forward(dino_224):
    """At 128 px the file's 14 x 14 grid stays in the model and every forward adds DINO's
    interpolation to 8 x 8: F.interpolate, bicubic, scale_factor 8.1 / 14, align_corners=False,
    recompute_scale_factor=False (the release's arguments, antialias off)."""
    backbone = build_backbone("dino_vits16", dino_224, 128, pos_embed="interpolate")
    stored = torch.load(dino_224, weights_only=True)["pos_embed"]
    vit = backbone.vit
    assert torch.equal(vit.pos_embed, stored) and vit.pos_embed.shape == (1, 197, 384)
    grid = stored[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(grid, scale_factor=(8.1 / 14, 8.1 / 14),
                                              mode="bicubic", align_corners=False,
                                              recompute_scale_factor=False)
    expected = torch.cat([stored[:, :1], patches.permute(0, 2, 3, 1).reshape(1, 64, 384)], 1)
    x = vit.patch_embed(torch.rand(2, 3, 128, 128))
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), x], dim=1)
    torch.testing.assert_close(vit._pos_embed(x), tokens + expected, rtol=0, atol=0)
    # timm's resample-once differs (antialiased, another scale): the choice matters
    resampled = build_backbone("dino_vits16", dino_224, 128).vit.pos_embed
    assert resampled.shape == (1, 65, 384)
    assert (resampled - expected).norm() > 0.05 * expected.norm()
    # gradients reach the stored 14 x 14 embeddings (pm fine-tunes them)
    (backbone(torch.rand(1, 3, 128, 128)) @ torch.randn(384)).sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


def test_interpolation_at_the_checkpoints_own_size_changes_nothing(tmp_path, tiny_state):
    """Same grid: DINO returns the embeddings untouched, so both modes build the same model
    (small_vit, trained at its own size, is unaffected by the choice)."""
    torch.save(tiny_state, tmp_path / "tiny.pth")
    x = torch.rand(2, 3, 32, 32)
    outputs = [build_backbone("tiny_vit", tmp_path / "tiny.pth", 32, pos_embed=mode)(x)
               for mode in ("resample", "interpolate")]
    assert torch.equal(*outputs)
    with pytest.raises(ValueError, match="pos_embed='bilinear'"):
        build_backbone("tiny_vit", None, 32, pos_embed="bilinear")


def test_normalisation_is_inside_the_backbone(tiny_state):
    backbone = build_backbone("tiny_vit", None, 32)
    backbone.vit.load_state_dict(tiny_state)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(backbone(x), backbone.vit((x - 0.5) / 0.5))
    assert isinstance(backbone, Backbone) and backbone.embed_dim == 32
    assert "mean" not in backbone.state_dict()


def test_missing_file_names_where_it_is_published(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such file; the official file is "
                                              "published at https://dl.fbaipublicfiles.com/dino"):
        build_backbone("dino_vits16", tmp_path / "nope.pth", 128)


def test_key_mismatch_lists_keys_and_file(tmp_path, tiny_state):
    state = dict(tiny_state)
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: keys do not match .* 1 missing "
                                              "\\['norm.weight'\\], 1 unexpected "
                                              "\\['extra.weight'\\]"):
        build_backbone("tiny_vit", tmp_path / "bad.pth", 32)


def test_pickled_code_is_refused(tmp_path, tiny_state, pickled_code):
    payload, marker = pickled_code
    torch.save({**tiny_state, "x": payload}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused.*posix.system"):
        build_backbone("tiny_vit", tmp_path / "evil.pth", 32)
    assert not marker.exists()


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match="'vit_huge'.*'dino_vits16'"):
        build_backbone("vit_huge", None, 128)


def test_small_vit_stem_folds_its_norms_without_changing_the_function():
    torch.manual_seed(0)
    backbone = build_backbone("small_vit", None, 32, frozen_norms=False)
    backbone.train()
    backbone(torch.rand(16, 3, 32, 32))  # BatchNorm statistics move in pretraining
    x = torch.rand(4, 3, 32, 32)
    backbone.eval()
    expected = backbone(x)
    folded = freeze_and_fold_norms(backbone.vit)
    norms = [m for m in folded.modules() if hasattr(m, "running_var")]
    assert norms and all(torch.allclose(m.weight, torch.ones_like(m.weight)) for m in norms)
    folded.train()  # frozen: train mode neither uses nor updates batch statistics
    assert torch.allclose(backbone(x), expected, atol=1e-5)
    assert torch.allclose(backbone(x[:1]), expected[:1], atol=1e-5)


def test_small_vit_is_built_with_frozen_norms_by_default():
    backbone = build_backbone("small_vit", None, 32).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.rand(8, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


@pytest.mark.parametrize("shape", [(3, 4, 8, 6), (2, 1, 5, 4)])  # odd height: torch's kernel
def test_fast_max_pool_equals_torch_and_keeps_its_gradient(shape):
    torch.manual_seed(0)
    x = torch.randn(shape).round(decimals=1)  # ties inside the 2x2 windows
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), nn.MaxPool2d(2)(x))
    leaf = x.clone().requires_grad_()
    MaxPool2x2()(leaf).sum().backward()
    expected = x.clone().requires_grad_()
    nn.MaxPool2d(2)(expected).sum().backward()
    assert torch.equal(leaf.grad, expected.grad)


def test_frozen_stem_runs_without_autograd_and_gives_the_same_embeddings():
    torch.manual_seed(0)
    backbone = build_backbone("small_vit", None, 32)
    x = torch.rand(4, 3, 32, 32)
    trainable = backbone(x)
    assert trainable.requires_grad
    backbone.requires_grad_(False)
    stem = backbone.vit.patch_embed(x)
    assert not stem.requires_grad and stem.grad_fn is None
    torch.testing.assert_close(backbone(x), trainable.detach(), rtol=0, atol=0)
    attacked = x.clone().requires_grad_()  # an attack differentiates through the frozen stem
    backbone(attacked)[:, 0].sum().backward()  # (a LayerNorm output sums to a constant)
    assert attacked.grad is not None and attacked.grad.abs().sum() > 0
