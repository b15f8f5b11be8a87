"""Backbones by name: a timm ViT, its normalisation, and how its checkpoint file is read.

A ``Backbone`` maps [0, 1] pixel images to embeddings (the pooled output of the final norm:
``global_pool`` of the spec, the CLS token for the official ViT-S/16 files); the
normalisation lives inside it so that attacks perturb pixels. Official checkpoints are read with
``torch.load(weights_only=True)``; each family has one function that turns the file's layout
into timm's keys. Position embeddings of another patch grid than the requested image size's
are either resampled once at load (timm's antialiased ``resample_abs_pos_embed``) or kept at
the file's grid and interpolated on every forward as DINO's ``interpolate_pos_encoding`` does
(PMF and the AMT release: AMT models/vision_transformer_amt_merge.py:170-197).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, freeze_batch_norm_2d, resample_abs_pos_embed
from torch import Tensor, nn

from amt.checkpoints import CheckpointError, is_model_file, load_file
from amt.registry import POS_EMBEDS, BackboneEntry, backbone_entry

_SHOWN = 5  # keys listed in an error message

StateDict = dict[str, Tensor]


def _flat(obj: Any, path: Path) -> StateDict:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, found "
                              f"{_describe(obj)}")
    return dict(obj)


def _nested(obj: Any, keys: tuple[str, ...], path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj:
                return _flat(obj[key], path)
    raise CheckpointError(f"{path}: expected the state dict under {' or '.join(map(repr, keys))}"
                          f", found {_describe(obj)}")


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a mapping with keys {list(obj)[:_SHOWN]}"
    return f"a {type(obj).__name__}"


def _without_head(state: StateDict) -> StateDict:
    """Drop classifier / projection heads: the backbone ends at the final norm."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def remap_dino(obj: Any, path: Path) -> StateDict:
    """DINO ``dino_deitsmall16_pretrain.pth``: a flat state dict with timm's keys."""
    return _without_head(_flat(obj, path))


def remap_ibot(obj: Any, path: Path) -> StateDict:
    """iBOT ``checkpoint_teacher.pth``: under 'teacher' or 'state_dict'; the multi-crop and DDP
    wrappers add 'module.' and 'backbone.' prefixes, and full checkpoints carry the iBOT head."""
    state = _nested(obj, ("teacher", "state_dict"), path)
    return _without_head({_strip_prefixes(k, ("module.", "backbone.")): v
                          for k, v in state.items()})


def remap_deit(obj: Any, path: Path) -> StateDict:
    """DeiT ``deit_small_patch16_224-cd65a155.pth``: under 'model', with an ImageNet head."""
    return _without_head(_nested(obj, ("model",), path))


class ConvStem(PatchEmbed):
    """timm's patch embedding with its single strided conv replaced by a small CNN (Xiao et al.
    2021, "Early convolutions help transformers see better"): per halving of the resolution a
    3x3 conv, BatchNorm, ReLU and 2x2 max-pool (16, 32, 64, ... channels), then a 1x1 conv to
    the embedding width. A plain ViT trained from scratch on a few CPU minutes of glyphs learns
    nothing (the loss stays at ln C); this stem lets it (GroupNorm instead of BatchNorm learns
    5x slower). The BatchNorms train during pretraining only: ``build_backbone`` freezes them
    (``frozen_norms``), so meta-tuning, attacks and episodes never depend on batch statistics."""

    def __init__(self, *args, stem_width: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        if patch != self.patch_size[1] or patch < 2 or patch & (patch - 1):
            raise ValueError(f"ConvStem: patch_size {self.patch_size}: expected a square power "
                             "of 2")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        channels, width = in_chans, stem_width
        for _ in range(patch.bit_length() - 1):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), MaxPool2x2()]
            channels, width = width, 2 * width
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # With nothing to differentiate (a frozen stem on clean images: lora, amt, evaluation)
        # run without autograd: oneDNN then picks its inference convolutions, ~1.8x faster on
        # the CPU than the training ones it uses whenever grad mode is on.
        if torch.is_grad_enabled() and not x.requires_grad and \
                not any(p.requires_grad for p in self.parameters()):
            with torch.no_grad():
                return super().forward(x)
        return super().forward(x)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``, identical output. Where no gradient will be asked for, a CPU tensor
    of even height and width is pooled as the maximum of its strided 2x2 views: torch's CPU
    max_pool2d always computes argmax indices too and is ~10x slower (3.6 ms for 80 images of
    16x32x32, 60% of the small ViT's stem)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or x.device.type != "cpu" or \
                x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2 or not x.is_contiguous():
            return super().forward(x)
        n, c, h, w = x.shape
        rows = x.view(n, c, h, w // 2, 2)
        rows = torch.maximum(rows[..., 0], rows[..., 1]).view(n, c, h // 2, 2, w // 2)
        return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1])


def freeze_and_fold_norms(vit: nn.Module) -> nn.Module:
    """After supervised pretraining: freeze every BatchNorm and fold its statistics and scale
    into the conv before it, leaving the norm a plain bias. The function is unchanged; what
    changes is the gradient the convs get when a method fine-tunes them (pm): through a frozen
    norm of small running variance it is ~8x the weight itself, and SGD meta-tuning diverges
    within a few episodes."""
    vit = freeze_batch_norm_2d(vit)
    for module in vit.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for conv, norm in zip(module[:-1], module[1:], strict=True):
            if isinstance(conv, nn.Conv2d) and conv.bias is None and \
                    hasattr(norm, "running_var") and not isinstance(norm, nn.BatchNorm2d):
                _fold(conv, norm)
    return vit


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    norm.bias.sub_(norm.running_mean * scale)
    norm.weight.fill_(1.0)
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)  # (var + eps)^-1/2 == 1


# Checkpoint family (registry.BackboneEntry.family) -> the function reading its files' layout.
REMAPS: dict[str, Callable[[Any, Path], StateDict]] = {
    "dino": remap_dino, "ibot": remap_ibot, "deit": remap_deit,
    "own": remap_dino,  # our model files hold timm's keys, flat
}
EMBED_LAYERS: dict[str, type[nn.Module]] = {"conv_stem": ConvStem}


def _timm_kwargs(entry: BackboneEntry) -> dict[str, Any]:
    kwargs = dict(entry.kwargs)
    if "embed_layer" in kwargs:
        kwargs["embed_layer"] = EMBED_LAYERS[kwargs["embed_layer"]]
    return kwargs


class Backbone(nn.Module):
    """[0, 1] images [n, 3, S, S] -> embeddings [n, D] (the spec's pooling after the final norm)."""

    def __init__(self, vit: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.vit = vit
        # Not persistent: vit.state_dict() keeps timm's keys, and the constants come from the spec.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.vit.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.vit((images - self.mean) / self.std)


def build_backbone(name: str, checkpoint: Path | None, image_size: int,
                   frozen_norms: bool = True, pos_embed: str = POS_EMBEDS[0]) -> Backbone:
    """The named backbone at ``image_size``, with weights from ``checkpoint`` (an official file
    of that family, or our own ``model.pt`` holding a full backbone); None -> random weights.
    ``frozen_norms``: BatchNorms (the built-in stem's) use their stored statistics in train mode
    too; only supervised pretraining trains them. ``pos_embed`` (a registry.POS_EMBEDS name):
    a checkpoint's position embeddings of another grid are resampled once at load, or kept and
    interpolated on every forward (random weights: the model's own grid either way)."""
    entry = backbone_entry(name)
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: expected a positive int")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed={pos_embed!r}: expected one of {list(POS_EMBEDS)}")
    state = None if checkpoint is None else read_backbone_state(name, Path(checkpoint))
    vit = timm.create_model(entry.arch, pretrained=False, num_classes=0, img_size=image_size,
                            **_timm_kwargs(entry))
    if frozen_norms:
        vit = freeze_batch_norm_2d(vit)
    if pos_embed == "interpolate":
        interpolate_pos_embed_on_forward(vit, None if state is None else state.get("pos_embed"))
    if state is not None:
        _load_into(vit, _fit_pos_embed(state, vit, Path(checkpoint)), Path(checkpoint))
    return Backbone(vit, entry.mean, entry.std)


def interpolate_pos_encoding(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding``: [1, 1 + N, D] embeddings of a square grid of N
    patches -> [1, 1 + rows * cols, D], the patch part by bicubic interpolation with scale
    factors (rows + 0.1) / sqrt(N) and (cols + 0.1) / sqrt(N), align_corners=False, no
    antialias; untouched when the grid is already square with N patches (AMT:
    models/vision_transformer_amt_merge.py:170-190; PMF: models/vision_transformer.py:156-178)."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    rows, cols = grid
    if rows * cols == n and rows == cols:
        return pos_embed
    side = math.sqrt(n)
    patches = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                            mode="bicubic", align_corners=False, recompute_scale_factor=False)
    if tuple(patches.shape[-2:]) != (rows, cols):
        raise ValueError(f"interpolating a {int(side)}x{int(side)} grid of position embeddings "
                         f"gave {tuple(patches.shape[-2:])}, not the model's {grid}")
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _interpolated_pos_embed(vit: nn.Module, x: Tensor) -> Tensor:
    """timm's ``_pos_embed`` (class token prepended, then the embeddings added) with the stored
    embeddings interpolated to the patch grid on every call. Patch tokens come as [n, rows,
    cols, D] from a ViT with ``dynamic_img_size`` (timm's test_vit), else as [n, L, D]."""
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(vit.patch_embed.grid_size)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, -2)], dim=1)
    return vit.pos_drop(x + interpolate_pos_encoding(vit.pos_embed, grid))


def interpolate_pos_embed_on_forward(vit: nn.Module, stored: Tensor | None) -> None:
    """Give ``vit`` a position embedding parameter of ``stored``'s shape (None: its own) and
    interpolate it to the patch grid on every forward, as DINO's ViT does."""
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class:
        raise ValueError(f"pos_embed='interpolate' needs a ViT with a class token whose position "
                         f"embedding is added after it ({type(vit).__name__} differs)")
    if stored is not None:
        vit.pos_embed = nn.Parameter(torch.zeros_like(stored))
    vit._pos_embed = types.MethodType(_interpolated_pos_embed, vit)


def read_backbone_state(name: str, path: Path) -> StateDict:
    """The timm state dict held by ``path``: an official file (through the family's remap) or
    one of our model files with a full backbone (pretrain, pm)."""
    entry = backbone_entry(name)
    obj = load_file(path, published=entry.published)
    if not is_model_file(obj):
        return REMAPS[entry.family](obj, path)
    if "backbone_state" not in obj:
        recorded = obj.get("backbone_checkpoint")
        raise CheckpointError(f"{path}: a {obj.get('method')!r} model file holds adapters only; "
                              f"pass the backbone file it was trained on (recorded: {recorded})")
    if obj.get("backbone") != name:
        raise CheckpointError(f"{path}: holds backbone {obj.get('backbone')!r}, not {name!r}")
    return _flat(obj["backbone_state"], path)


def _fit_pos_embed(state: StateDict, vit: nn.Module, path: Path) -> StateDict:
    """Resample the checkpoint's position embeddings to the model's patch grid."""
    if "pos_embed" not in state:
        return state  # reported as a missing key by _load_into
    posemb, target = state["pos_embed"], vit.pos_embed
    if posemb.shape == target.shape:
        return state
    prefix = vit.num_prefix_tokens
    grid = (posemb.shape[1] - prefix) ** 0.5
    if posemb.ndim != 3 or posemb.shape[2] != target.shape[2] or grid != int(grid):
        raise CheckpointError(f"{path}: pos_embed of shape {tuple(posemb.shape)} cannot be "
                              f"resampled to {tuple(target.shape)}")
    resampled = resample_abs_pos_embed(posemb, new_size=list(vit.patch_embed.grid_size),
                                       num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled}


def _load_into(vit: nn.Module, state: StateDict, path: Path) -> None:
    expected = vit.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: keys do not match {type(vit).__name__} after remapping: "
                              f"{len(missing)} missing {missing[:_SHOWN]}, {len(unexpected)} "
                              f"unexpected {unexpected[:_SHOWN]}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes differ from the model: {wrong[:_SHOWN]}")
    vit.load_state_dict(state)
