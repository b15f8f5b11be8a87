"""Selection files (``python -m amt select``): the test-time hyperparameters chosen for one
(method, domain) on its validation episodes, tied to the model they were selected for."""

from __future__ import annotations

import json
from pathlib import Path

from amt.errors import UserError
from amt.registry import method_entry
from amt.specs import Hyper, build
from data_prep.files import file_sha256 as sha256

SELECTION_FORMAT = "amt-selection"


def load_selection(path: Path, model: Path) -> tuple[Hyper, list[str]]:
    """A selection file (``python -m amt select``): its hyperparameters and which it selected.
    It must have been selected for ``model`` (same SHA-256): another pool's choices would
    apply silently."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable selection JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != SELECTION_FORMAT:
        raise UserError(f"{path}: not an {SELECTION_FORMAT!r} file")
    selected = document.get("selected")
    if not isinstance(selected, list):
        raise UserError(f"{path}: 'selected' must list the hyperparameters it chose")
    if document.get("model_sha256") != sha256(model):
        raise UserError(f"{path}: selected for model {document.get('model')!r} (SHA-256 "
                        f"{document.get('model_sha256')}), not for {model}; select again")
    return build(Hyper, document.get("hyperparameters", {}), str(path)), selected


def read_selection(path: Path | None, method: str, model: Path) -> Hyper:
    """The hyperparameters for ``method`` from a selection file, which must have selected every
    one the method uses; None is fine for methods that use none."""
    needed = method_entry(method).tuned
    if path is None:
        if needed:
            raise UserError(f"method {method} uses {list(needed)}: pass the JSON written by "
                             "`python -m amt select` for this domain")
        return Hyper()
    hyper, selected = load_selection(path, model)
    missing = [k for k in needed if k not in selected]
    if missing:
        raise UserError(f"{path}: selected {selected}; method {method} also needs {missing}")
    return hyper
