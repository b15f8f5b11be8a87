"""Run files on disk: atomic writes, safe loading, RNG state, provenance.

Every file here holds tensors and plain containers only, so it loads with
``torch.load(weights_only=True)``; a file with any other pickled object (which could run code)
is refused. Two tagged formats:

- ``amt-checkpoint``: a training run in progress (trainable tensors, optimiser, episode counter,
  RNG states, config, the validation so far with the best epoch's trainable tensors); written
  every N episodes as ``checkpoint.pt``.
- ``amt-model``: a finished model file (``model.pt``); its ``method`` says what it holds:
  ``pretrain`` and ``pm`` a full backbone (``backbone_state``, timm keys), ``lora`` and ``amt``
  adapters only (``lora``) to be applied to the backbone file recorded in it; all but
  ``pretrain`` also the ProtoNet ``head``. ``pos_embed`` records how the backbone's position
  embeddings were fitted to its image size (files without it: resampled at load).
  ``release``: the ViT of the authors' released checkpoint, its adapted layers holding their
  residual W_res (``amt.release``), read through the pool that records it.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from amt.errors import UserError
from amt.registry import POS_EMBEDS
from data_prep.files import file_sha256 as sha256  # noqa: F401  (re-exported: amt names it so)
from data_prep.files import fsync_file

CHECKPOINT_FORMAT = "amt-checkpoint"
MODEL_FORMAT = "amt-model"
FORMAT_VERSION = 1
# The files a training run leaves in its folder.
CHECKPOINT, MODEL, LOG, MANIFEST = "checkpoint.pt", "model.pt", "train_log.csv", "manifest.json"
VALID_LOG = "valid_log.csv"  # meta-tuning: validation accuracy per epoch, the kept one marked


def recorded_pos_embed(obj: dict) -> str:
    """A model or pool file's position-embedding mode (registry.POS_EMBEDS); files written
    before it was recorded resampled at load."""
    return obj.get("pos_embed", POS_EMBEDS[0])


class CheckpointError(UserError):
    """A checkpoint or model file is missing, unsafe, unreadable or of another format."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a bad episode); the last checkpoint is kept."""


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors detached and on the CPU, as model files store them."""
    return {k: v.detach().cpu() for k, v in state.items()}


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over ``path``: a run
    killed mid-write leaves the previous file intact. Saved through a file handle: given a
    path, torch.save names the zip archive's records after the file, and the temporary name
    (with its process id) would make identical runs write different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save(obj, handle)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def load_file(path: Path, published: str | None = None, allowed: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    ``published`` (where an official file can be downloaded) is added to the missing-file error.
    ``allowed``: plain-data classes a foreign file may hold besides tensors and containers
    (``argparse.Namespace`` in the authors' checkpoints); they are rebuilt from their attribute
    values alone, which are held to the same rules.
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; the official file is published at {published}" if published else ""
        raise CheckpointError(f"{path}: no such file{hint}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        kinds = ["tensors", "plain containers",
                 *(f"{cls.__module__}.{cls.__qualname__}" for cls in allowed)]
        raise CheckpointError(
            f"{path}: refused: it holds non-tensor objects (pickled code or classes) or is not "
            f"a torch file; only {', '.join(kinds[:-1])} and {kinds[-1]} are loaded, and "
            f"nothing in a file is executed ({_unpickling_detail(err)})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch file (truncated?): {err}") from err


def _unpickling_detail(err: Exception) -> str:
    """torch's reason (e.g. the unsupported global), without its advice: the hint to re-run
    with weights_only=False would execute the file."""
    advice = ("weights_only", "check the documentation", "please file an issue", "in pytorch",
              "re-running", "you can use", "only load", "do it only")
    lines = [line.strip() for line in str(err).splitlines()]
    detail = [line for line in lines if line and not any(a in line.lower() for a in advice)]
    return " ".join(detail) or "unsupported content"


def load_tagged(path: Path, fmt: str) -> dict:
    """Load a file of our own ``fmt`` (CHECKPOINT_FORMAT or MODEL_FORMAT) and check its tag."""
    obj = load_file(path)
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {fmt!r}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {fmt} version {obj.get('format_version')!r}, this code "
                              f"reads version {FORMAT_VERSION}")
    return obj


def is_model_file(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT


def rng_state() -> dict:
    """Global RNG states (torch CPU, CUDA if initialised, numpy) as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def environment() -> dict:
    """Versions and machine, for manifests."""
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cuda": torch.version.cuda}
