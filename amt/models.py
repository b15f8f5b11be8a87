"""Reading meta-tuned model files (``model.pt``, written by ``python -m amt train``) back into
a backbone and its ProtoNet head."""

from __future__ import annotations

from pathlib import Path

import torch

from amt.backbones import Backbone, build_backbone
from amt.checkpoints import (
    MODEL_FORMAT,
    CheckpointError,
    load_tagged,
    recorded_pos_embed,
    sha256,
)
from amt.lora import LoRAState, inject_lora
from amt.lora import load_state as load_lora_state
from amt.protonet import ProtoHead
from amt.registry import FULL_BACKBONE_TRAINERS, TRAINERS


def load_trained(path: Path, backbone_checkpoint: Path | None = None,
                 device: torch.device | str = "cpu") -> tuple[Backbone, ProtoHead]:
    """A meta-tuned model.pt as (backbone, head). lora/amt files are applied (unmerged) to the
    backbone file recorded in them, or to ``backbone_checkpoint``, which must have the same
    contents (SHA-256) as the file they were trained on, on the residual recorded (SVD, or W
    itself for the standard LoRA initialisation); position embeddings as recorded."""
    obj = load_tagged(Path(path), MODEL_FORMAT)
    if obj["method"] not in TRAINERS:
        raise CheckpointError(f"{path}: a {obj['method']!r} model file has no ProtoNet head")
    pos_embed = recorded_pos_embed(obj)
    if obj["method"] in FULL_BACKBONE_TRAINERS:
        backbone = build_backbone(obj["backbone"], Path(path), obj["image_size"],
                                  pos_embed=pos_embed)
    else:
        base = Path(backbone_checkpoint or obj["backbone_checkpoint"])
        if obj["backbone_sha256"] and sha256(base) != obj["backbone_sha256"]:
            raise CheckpointError(f"{path}: its adapters were trained on a backbone file with "
                                  f"SHA-256 {obj['backbone_sha256']}, {base} differs")
        backbone = build_backbone(obj["backbone"], base, obj["image_size"], pos_embed=pos_embed)
        inject_lora(backbone.vit, obj["rank"], obj["targets"], obj.get("residual", "svd"))
        load_lora_state(backbone.vit, LoRAState.from_tensors(obj["lora"]))
    head = ProtoHead()
    head.load_state_dict(obj["head"])
    return backbone.to(device), head.to(device)
