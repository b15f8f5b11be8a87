"""The authors' released AMT checkpoints as this project's pool: ``python -m amt import-release``.

The release (github xyang583/AMT, commit ca4b8190) publishes the meta-tuned pools of its README's
Tables 1-3 (``checkpoints/metadataset_imagenet_advmetatuned_5w1s.pth`` and ``_5w5s.pth``,
AMT: README.md:37-42). Its test model is ``ProtoNetMerge`` over ``vit_small_amt_merge``
(AMT: models/protonet_merge.py:9-25, models/vision_transformer_amt_merge.py:231-248); the file
holds its state dict under ``model``:

- ``scale_cls`` and ``bias`` [1]: one ProtoNet head, ``scale_cls * (cos + bias)``, for the whole
  pool (AMT: models/protonet_merge.py:12-13, 33-39), so every member gets it;
- ``backbone.model.<key>``: DINO's ViT-S/16 with timm's key names, ``pos_embed`` at the 14x14
  grid of 224 px (197 tokens), which the release interpolates on every forward (AMT:
  models/vision_transformer_amt_merge.py:170-197);
- ``backbone.model.<layer>.lora_A.<i>`` / ``lora_B.<i>``: expert i's rank-r adapter of each of
  ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` in every block, scaling alpha / r =
  8 / 8 = 1 (AMT: models/__init__.py:115-120, layers_merge.py:357,471). The fused qkv's A
  [3r, in] and B [3 out, r] merge as a grouped product (AMT: layers_merge.py:506-514): the q, k
  and v blocks g = 0, 1, 2 of the weight get B[g out:(g+1) out] @ A[g r:(g+1) r], which is our
  per-block adapter ``<layer>.q`` / ``.k`` / ``.v`` (``amt.lora.FUSED_BLOCKS``).

The release merges onto the adapted layers' ``weight`` as stored: expert p alone to score it,
``weight + B_p A_p``, then ``weight + sum_p w_p B_p A_p`` (AMT: layers_merge.py:379-411,
516-544). That weight is the residual W_res left by the SVD initialisation of training
(AMT: layers.py:163-186), and the file does not hold the W it came from. Our pools rebuild W_res
by an SVD of their backbone file (``amt.lora``), which could not give the release's W_res bit for
bit (its float32 ``torch.linalg.svd`` of DINO's weights against our float64 one) and needs W.
So the import keeps the stored weights: it writes the release's ViT, residuals included, as a
backbone file beside the pool (a ``release`` model file, its SHA-256 recorded in the pool) and
marks the pool ``residual: "stored"``; ``amt.pool.load_pool`` then takes W_res as stored, and
every merged weight is the release's own. The position embeddings keep the file's 197 tokens;
the pool records how the backbone meets the image size (``pos_embed``, build_backbone's
resampling today; the release's per-forward interpolation is a mode of its own).

A checkpoint written by the release's main.py also holds its ``args`` (an argparse.Namespace),
optimizer and scheduler states, ``epoch``, ``model_ema`` and ``scalar`` (AMT: main.py:171-180).
It is read with ``torch.load(weights_only=True)`` allowing argparse.Namespace alone: anything
else that is not tensors and plain containers is refused, and nothing in the file executes.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from amt.backbones import build_backbone
from amt.checkpoints import (
    FORMAT_VERSION,
    MODEL_FORMAT,
    CheckpointError,
    load_file,
    save_atomic,
    sha256,
)
from amt.lora import FUSED_BLOCKS, Adapter, LoRAState, inject_lora, load_state
from amt.pool import write_pool
from amt.registry import LORA_TARGETS, RELEASE, RELEASE_PUBLISHED
from amt.specs import ImportConfig, add_spec_argument, spec_from_args

log = logging.getLogger(__name__)

PREFIX = "backbone.model."  # ProtoNetMerge.backbone (LoraModel) .model (the ViT)
HEAD = {"scale_cls": "scale", "bias": "bias"}  # the release's head -> ProtoHead's
EXPERT = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])\.(?P<index>[0-9]+)")
# A merge model that has run forward also holds a copy of each adapted weight taken before
# merging (AMT: layers_merge.py:386, 521), equal to the weight once it unmerged.
MERGE_COPY = ".ori_weight"
ALLOWED = (argparse.Namespace,)  # main.py's args: plain values only
_SHOWN = 5

Experts = dict[str, dict[int, dict[str, Tensor]]]  # layer -> expert -> {"A", "B"}


def read_release(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(the test model's state dict, what else the file says: epoch and args as plain values)."""
    obj = load_file(path, published=RELEASE_PUBLISHED, allowed=ALLOWED)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        found = f"keys {list(obj)[:_SHOWN]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected the release's checkpoint, its test model's "
                              f"state dict under 'model'; found {found}")
    state = obj["model"]
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' holds non-tensor values")
    args = obj.get("args")
    return dict(state), {"epoch": obj.get("epoch"),
                         "args": _plain(args) if isinstance(args, argparse.Namespace) else {}}


def _plain(value: object) -> object:
    """argparse.Namespace (nested too) as dicts: the pool loads with no allow-list."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def split_release(state: dict[str, Tensor], path: Path
                  ) -> tuple[dict[str, Tensor], Experts, dict[str, Tensor]]:
    """The release's state dict as (ViT state with timm keys, experts by layer, ProtoHead state);
    every tensor in float32."""
    vit, experts, copies = {}, {}, {}
    unindexed = [k for k in state if k.endswith((".lora_A", ".lora_B"))]
    if unindexed:
        raise CheckpointError(f"{path}: {unindexed[0]} has no expert index: a training "
                              "checkpoint (ProtoNet over vit_small_amt, one adapter); the import "
                              "reads the test model's pool, backbone.model.<layer>.lora_A.<i>")
    stray = [k for k in state if not k.startswith(PREFIX) and k not in HEAD]
    missing = [k for k in HEAD if k not in state]
    if stray or missing:
        raise CheckpointError(f"{path}: not the release's ProtoNetMerge state dict: keys "
                              f"{stray[:_SHOWN]} are outside {PREFIX}*, head keys {missing} are "
                              "missing")
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        if key in HEAD:
            continue
        if match := EXPERT.fullmatch(name):
            slot = experts.setdefault(match["layer"], {}).setdefault(int(match["index"]), {})
            slot[match["part"]] = value.float()
        elif name.endswith(MERGE_COPY):
            copies[name.removesuffix(MERGE_COPY) + ".weight"] = value.float()
        else:
            vit[name] = value.float()
    _check_copies(copies, vit, path)
    head = {}
    for key, ours in HEAD.items():
        if state[key].numel() != 1:
            raise CheckpointError(f"{path}: {key} of shape {tuple(state[key].shape)}; expected "
                                  "one value")
        head[ours] = state[key].reshape(()).float()
    return vit, experts, head


def _check_copies(copies: dict[str, Tensor], vit: dict[str, Tensor], path: Path) -> None:
    differing = [k for k, v in copies.items() if k not in vit or not torch.equal(v, vit[k])]
    if differing:
        raise CheckpointError(f"{path}: {differing[0]}: its {MERGE_COPY} differs: saved while "
                              "merged; the unmerged weights are unknown")


def members(experts: Experts, path: Path) -> list[LoRAState]:
    """One LoRAState per expert, the fused layers split into their per-block adapters."""
    if not experts:
        raise CheckpointError(f"{path}: no expert adapters (<layer>.lora_A.<i>)")
    indices = {layer: sorted(by_index) for layer, by_index in experts.items()}
    first = next(iter(indices.values()))
    uneven = {layer: found for layer, found in indices.items() if found != first}
    if first != list(range(len(first))) or uneven:
        raise CheckpointError(f"{path}: experts {first} of {next(iter(indices))}, but "
                              f"{dict(list(uneven.items())[:_SHOWN])}; expected experts "
                              "0..P-1 in every adapted layer")
    pool = []
    for index in first:
        adapters = {}
        for layer, by_index in experts.items():
            adapters.update(_adapters(layer, by_index[index], f"{path}: expert {index}"))
        pool.append(LoRAState(adapters))
    return pool


def _adapters(layer: str, parts: dict[str, Tensor], where: str) -> dict[str, Adapter]:
    """A layer's (A, B) as our adapters: a fused layer's groups g as <layer>.<block g>."""
    if set(parts) != {"A", "B"}:
        raise CheckpointError(f"{where}: {layer} has lora_{''.join(sorted(parts))} only")
    a, b = parts["A"], parts["B"]
    blocks = FUSED_BLOCKS.get(layer.rpartition(".")[2])
    groups = len(blocks) if blocks else 1
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] % groups or b.shape[0] % groups or \
            b.shape[1] * groups != a.shape[0]:
        raise CheckpointError(f"{where}: {layer}: lora_A {tuple(a.shape)} and lora_B "
                              f"{tuple(b.shape)} are not {groups} group(s) of rank-r factors")
    if not blocks:
        return {layer: (a, b)}
    pairs = zip(a.chunk(groups), b.chunk(groups), strict=True)
    return {f"{layer}.{block}": (ga.clone(), gb.clone())
            for block, (ga, gb) in zip(blocks, pairs, strict=True)}


def import_release(config: ImportConfig) -> Path:
    """Write the release's ViT as a backbone file and its experts as a pool (module docstring);
    both are read back through the pool loader's path before the pool is written."""
    source, digest = config.checkpoint, sha256(config.checkpoint)
    state, info = read_release(source)
    vit, experts, head = split_release(state, source)
    states = members(experts, source)
    ranks = {a.shape[0] for s in states for a, _ in s.adapters.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"{source}: adapters of ranks {sorted(ranks)}; expected one rank")
    save_atomic({"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "method": RELEASE,
                 "backbone": config.backbone, "image_size": config.image_size,
                 "backbone_state": vit, "source": str(source), "source_sha256": digest},
                config.backbone_out)
    try:
        _check_fits(config, states, ranks.pop())
    except CheckpointError:
        config.backbone_out.unlink()
        raise
    records = [{"source": str(source), "source_sha256": digest, "method": RELEASE,
                "budgets": [],  # the release does not say what its experts trained with
                "config": {"expert": i, **info}, "lora": s.to_tensors(), "head": head}
               for i, s in enumerate(states)]
    reference = {"backbone": config.backbone, "backbone_checkpoint": str(config.backbone_out),
                 "backbone_sha256": sha256(config.backbone_out), "image_size": config.image_size,
                 "pos_embed": config.pos_embed, "rank": states[0].rank,
                 "targets": list(LORA_TARGETS)}
    log.info("%s: %d experts of rank %d on %s (epoch %s), head scale %.4f bias %.4f",
             source, len(states), states[0].rank, config.backbone, info["epoch"],
             float(head["scale"]), float(head["bias"]))
    return write_pool(reference, records, "separate", config.out, residual="stored")


def _check_fits(config: ImportConfig, states: list[LoRAState], rank: int) -> None:
    """The backbone file builds the named backbone, and every expert fits its adapted layers."""
    try:
        backbone = build_backbone(config.backbone, config.backbone_out, config.image_size)
    except CheckpointError as err:
        raise CheckpointError(f"{config.checkpoint}: its ViT is not {config.backbone}: "
                              f"{str(err).removeprefix(f'{config.backbone_out}: ')}") from err
    inject_lora(backbone.vit, rank, LORA_TARGETS, residual="stored")
    for i, state in enumerate(states):
        try:
            load_state(backbone.vit, state)
        except ValueError as err:
            raise CheckpointError(f"{config.checkpoint}: expert {i} does not fit "
                                  f"{config.backbone}'s layers {list(LORA_TARGETS)}: {err}"
                                  ) from err


def cmd_import_release(args: argparse.Namespace) -> int:
    import_release(spec_from_args(ImportConfig, args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-release`` command."""
    p = subparsers.add_parser("import-release", help="convert the authors' released AMT "
                              "checkpoint into a pool file (and its backbone file)")
    add_spec_argument(p, ImportConfig)
    p.add_argument("checkpoint", type=Path, nargs="?", metavar="CHECKPOINT",
                   help="e.g. metadataset_imagenet_advmetatuned_5w1s.pth (published in "
                   f"{RELEASE_PUBLISHED})")
    p.add_argument("--backbone", help="the registry backbone it meta-tuned (dino_vits16)")
    p.add_argument("--out", type=Path, help="the pool file to write")
    p.add_argument("--backbone-out", type=Path,
                   help="the backbone file to write (default: <out stem>_backbone.pt)")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    p.set_defaults(func=cmd_import_release)
