"""Inputs that used to be accepted silently: each is refused when the job starts, by a message
naming the file, key or value and what was expected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import make_episodes, make_pool, model_file, template_domain

from amt.checkpoints import sha256
from amt.errors import UserError
from amt.evaluate import evaluate
from amt.selections import SELECTION_FORMAT
from amt.specs import EvalConfig, parse_attacks
from data_prep.store import DomainStore

pytestmark = pytest.mark.usefixtures("one_thread")
AMT_KEYS = ["beta", "gamma", "top_k", "str_layers", "str_ratio"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    torch.set_num_threads(1)
    store = template_domain(folder / "domain.h5")
    found = {"folder": folder, "store": store, "pool": make_pool(folder, members=2),
             "backbone": folder / "tiny_backbone.pth",
             "episodes": make_episodes(store, folder / "test.json"),
             "5w5s": make_episodes(store, folder / "5w5s.json", shots=5, queries=1)}
    found["pm"] = model_file(folder, found["backbone"], "pm", method="pm")
    for name in ("pool", "pm"):
        found[f"{name}_selection"] = _selection(folder / f"{name}_selection.json", found[name])
    return found


def _selection(path: Path, model: Path) -> Path:
    path.write_text(json.dumps({"format": SELECTION_FORMAT, "selected": AMT_KEYS,
                                "hyperparameters": {}, "model": str(model),
                                "model_sha256": sha256(model)}))
    return path


def _edited_episodes(files: dict, change) -> Path:
    """The test episodes with ``change(document, store)`` applied."""
    document = json.loads(files["episodes"].read_text())
    change(document, DomainStore(files["store"]))
    path = files["folder"] / f"edited_{change.__name__}.json"
    path.write_text(json.dumps(document))
    return path


def image_of_another_class(document: dict, store: DomainStore) -> None:
    episode = document["episodes"][0]
    other = episode["classes"][1]  # an image of label 1's class listed under label 0
    used = {i for group in episode["support"] + episode["query"] for i in group}
    start = int(store.class_offsets[other])
    episode["support"][0][0] = next(i for i in range(start, start + 6) if i not in used)


def class_999(document: dict, store: DomainStore) -> None:
    document["episodes"][0]["classes"][0] = 999


def _evaluate(files: dict, tmp_path: Path, **overrides) -> None:
    config = dict(method="amt", model=files["pool"], store=files["store"],
                  episodes=files["episodes"], benchmark="b", domain="d", in_domain=False,
                  setting_name="5w1s", out=tmp_path / "out.csv",
                  selection=files["pool_selection"], device="cpu")
    evaluate(EvalConfig(**{**config, **overrides}))


# (bad input, what the job is given, the message it must get)
CASES = [
    ("episode image of another class",
     lambda f: {"episodes": _edited_episodes(f, image_of_another_class)},
     r"edited_image_of_another_class\.json: episode 0: support image \d+ is listed under class "
     r"\d+, whose images are \d+\.\.\.\d+"),
    ("episode class 999",
     lambda f: {"episodes": _edited_episodes(f, class_999)},
     r"edited_class_999\.json: episode 0: class 999 is not a class of the 'test' split"),
    ("5w5s episodes under setting 5w1s", lambda f: {"episodes": f["5w5s"]},
     r"5w5s\.json: drawn for setting '5w5s' .*job is for setting '5w1s'"),
    ("selection of another model", lambda f: {"selection": f["pm_selection"]},
     r"pm_selection\.json: selected for model '.*pm\.pt' .*not for .*pool\.pt; select again"),
    ("--backbone-checkpoint given to pm",
     lambda f: {"method": "pm", "model": f["pm"], "selection": None,
                "backbone_checkpoint": f["backbone"]},
     r"--backbone-checkpoint .*tiny_backbone\.pth: method pm .* would ignore it"),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_job_inputs_are_refused_by_name(files, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _evaluate(files, tmp_path, **overrides(files))
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(("eps", "message"), [
    (2, r"--attacks\[0\]: eps: budget 2: expected a value in \(0, 1\]"),
    ("8", r"budget '8': expected a value in \(0, 1\] \(pixel space is \[0, 1\]"),
    (0, r"budget 0: expected a value in \(0, 1\]"),
    ("-1/255", r"budget '-1/255': expected a value in \(0, 1\]"),
    ("4/0", r"budget '4/0' is not a number .*non-zero denominator"),
])
def test_bad_budgets_are_refused_by_value(eps, message):
    with pytest.raises(UserError, match=message):
        parse_attacks([{"attack": "pgd", "norm": "linf", "eps": [eps]}])


def test_cli_refuses_a_malicious_checkpoint_in_one_message(files, tmp_path, pickled_code):
    payload, marker = pickled_code
    bad = tmp_path / "model.pt"
    torch.save({"format": "amt-model", "payload": payload}, bad)
    run = subprocess.run(
        [sys.executable, "-m", "amt", "evaluate", "--method", "pm", "--model", str(bad),
         "--store", str(files["store"]), "--episodes", str(files["episodes"]),
         "--benchmark", "b", "--domain", "d", "--no-in-domain", "--setting-name", "5w1s",
         "--device", "cpu", "--out", str(tmp_path / "out.csv")],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert run.returncode == 2 and not marker.exists()
    assert f"error: {bad}: refused: it holds non-tensor objects" in run.stderr
    assert "Traceback" not in run.stderr and "weights_only=False" not in run.stderr
