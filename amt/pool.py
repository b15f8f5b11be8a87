"""The robust LoRA pool: P adapters meta-tuned on one backbone file, stored as one artefact.

All members share the residual W_res of the backbone file they were trained on (the SVD is
deterministic, see ``amt.lora``; with the standard LoRA initialisation W_res is W itself), so
the pool file holds the backbone *reference* once (name, file, SHA-256, image size,
position-embedding mode, rank, targets) and, per member, its
adapters, its ProtoNet head, its training budgets (what it actually trained with: one fixed
budget, or the several it drew from per episode; none for plain lora or with APQ off) and
training configuration.
``load_pool`` rebuilds W_res from the backbone file, whose SHA-256 must match, instead of
storing it again: by SVD (``residual`` "svd"), or, for the authors' released pool, whose
backbone file holds the residuals themselves, as stored ("stored", ``amt.release``).
``pos_embed`` records how the backbone's position embeddings meet the image size
(``amt.registry.POS_EMBEDS``).

File (``torch.save``; loads with ``weights_only=True``)::

    {"format": "amt-pool", "format_version": 1, "strategy": "separate",
     "backbone", "backbone_checkpoint", "backbone_sha256", "image_size", "pos_embed", "rank",
     "targets", "residual": "svd",
     "members": [{"source", "source_sha256", "method", "budgets", "config",
                  "lora": {name.A, name.B}, "head": {scale, bias}}, ...]}

``python -m amt pool --members a/model.pt b/model.pt ... --strategy separate --out pool.pt``
(or ``--spec`` with a ``PoolConfig`` as JSON)
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from amt.backbones import Backbone, build_backbone
from amt.checkpoints import (
    FORMAT_VERSION,
    MODEL_FORMAT,
    CheckpointError,
    load_tagged,
    recorded_pos_embed,
    save_atomic,
    sha256,
)
from amt.lora import RESIDUALS, LoRAState, inject_lora
from amt.protonet import ProtoHead
from amt.registry import POOL_STRATEGIES, POS_EMBEDS
from amt.specs import PoolConfig, add_spec_argument, spec_from_args

log = logging.getLogger(__name__)

POOL_FORMAT = "amt-pool"
MEMBER_METHODS = ("lora", "amt")
SHARED = ("backbone", "backbone_checkpoint", "backbone_sha256", "image_size", "pos_embed", "rank",
          "targets")


@dataclass
class Pool:
    """A loaded pool: the backbone with LoRA layers on W_res (frozen), the members' adapters and
    heads (frozen), all on one device."""

    backbone: Backbone
    members: list[LoRAState]
    heads: list[ProtoHead]
    budgets: list[tuple[float, ...]]  # per member, the APQ budgets it trained with
    strategy: str
    info: dict  # the shared backbone reference (SHARED keys)

    def __len__(self) -> int:
        return len(self.members)


def _member(path: Path) -> dict:
    obj = load_tagged(path, MODEL_FORMAT)
    if obj.get("method") not in MEMBER_METHODS:
        raise CheckpointError(f"{path}: a {obj.get('method')!r} model file; pool members must be "
                              f"adapter files of method {' or '.join(MEMBER_METHODS)}")
    if not obj.get("backbone_sha256"):
        raise CheckpointError(f"{path}: records no backbone SHA-256; cannot prove the members "
                              "share one backbone file")
    return obj


def _shared(obj: dict) -> dict:
    shared = {**obj, "pos_embed": recorded_pos_embed(obj)}
    return {k: list(shared[k]) if k == "targets" else shared[k] for k in SHARED}


def _budgets(obj: dict) -> list[float]:
    """The APQ budgets a member trained with: one fixed budget, or the several it drew from per
    episode; none for plain lora or with APQ switched off."""
    config = obj.get("config", {})
    adversarial = obj["method"] == "amt" and config.get("apq", True)
    return [float(b) for b in config.get("budgets", ())] if adversarial else []


def assemble_pool(config: PoolConfig) -> Path:
    """Check the members (lora/amt model files on the same backbone file, rank, targets and
    image size) and write them as one pool file at ``config.out``."""
    paths, out, strategy = list(config.members), config.out, config.strategy
    objs = [_member(p) for p in paths]
    reference = _shared(objs[0])
    for path, obj in zip(paths[1:], objs[1:], strict=True):
        differing = {k: (reference[k], v) for k, v in _shared(obj).items()
                     if k != "backbone_checkpoint" and v != reference[k]}
        if differing:
            raise CheckpointError(f"{path}: differs from {paths[0]} in {differing} "
                                  "(first value: the first member's); pool members must share "
                                  "one backbone file, rank, targets and image size")
    # members written before the key: SVD residuals
    residuals = {str(p): o.get("residual", "svd") for p, o in zip(paths, objs, strict=True)}
    if len(set(residuals.values())) > 1:
        raise CheckpointError(f"members were trained on different residuals {residuals} (SVD "
                              "and standard LoRA initialisations): one pool needs one W_res")
    members = [{"source": str(p), "source_sha256": sha256(p), "method": o["method"],
                "budgets": _budgets(o), "config": o.get("config", {}), "lora": o["lora"],
                "head": o["head"]} for p, o in zip(paths, objs, strict=True)]
    return write_pool(reference, members, strategy, Path(out), residuals[str(paths[0])])


def write_pool(reference: dict, members: list[dict], strategy: str, out: Path,
               residual: str = "svd") -> Path:
    """The pool file: the shared backbone reference (SHARED keys, the position-embedding mode
    among them), how W_res is rebuilt from it, and the members."""
    save_atomic({"format": POOL_FORMAT, "format_version": FORMAT_VERSION, "strategy": strategy,
                 **reference, "residual": residual, "members": members}, out)
    log.info("pool of %d members (budgets %s) on %s -> %s", len(members),
             [[round(b, 5) for b in m["budgets"]] for m in members], reference["backbone"],
             out)
    return out


def load_pool(path: Path, device: torch.device | str = "cpu",
              backbone_checkpoint: Path | None = None) -> Pool:
    """The pool at ``path`` on ``device``: LoRA layers injected into the recorded backbone file
    (or ``backbone_checkpoint``, which must have the recorded SHA-256), everything frozen."""
    obj = load_tagged(Path(path), POOL_FORMAT)
    # pools written before these keys existed: SVD residuals, resampled position embeddings
    residual, pos_embed = obj.get("residual", "svd"), recorded_pos_embed(obj)
    if residual not in RESIDUALS or pos_embed not in POS_EMBEDS:
        raise CheckpointError(f"{path}: residual {residual!r} and pos_embed {pos_embed!r}: this "
                              f"code rebuilds residuals {list(RESIDUALS)} and position "
                              f"embeddings {list(POS_EMBEDS)}")
    base = Path(backbone_checkpoint or obj["backbone_checkpoint"])
    if sha256(base) != obj["backbone_sha256"]:
        raise CheckpointError(f"{path}: its members were trained on a backbone file with "
                              f"SHA-256 {obj['backbone_sha256']}; {base} differs")
    backbone = build_backbone(obj["backbone"], base, obj["image_size"], pos_embed=pos_embed)
    inject_lora(backbone.vit, obj["rank"], obj["targets"], residual)
    backbone.requires_grad_(False).eval().to(device)
    members, heads = [], []
    for i, member in enumerate(obj["members"]):
        try:
            members.append(LoRAState.from_tensors(member["lora"]).to(device))
        except ValueError as err:
            raise CheckpointError(f"{path}: member {i} ({member['source']}): {err}") from err
        head = ProtoHead()
        head.load_state_dict(member["head"])
        heads.append(head.requires_grad_(False).to(device))
    return Pool(backbone, members, heads, [tuple(m["budgets"]) for m in obj["members"]],
                obj["strategy"], _shared(obj))


def cmd_pool(args: argparse.Namespace) -> int:
    assemble_pool(spec_from_args(PoolConfig, args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pool`` command."""
    p = subparsers.add_parser("pool", help="assemble meta-tuned adapters into one LoRA pool")
    add_spec_argument(p, PoolConfig)
    p.add_argument("--members", type=Path, nargs="+", metavar="MODEL_PT",
                   help="lora/amt model.pt files trained on the same backbone file")
    p.add_argument("--strategy", help="how the members' budgets were chosen (recorded): "
                   f"one of {list(POOL_STRATEGIES)}")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_pool)
