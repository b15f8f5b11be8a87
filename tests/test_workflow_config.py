"""The config check the workflow runs before planning: a table of bad configs and the message
each gets (in-process), and the paper config on a machine without its data (snakemake -n)."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from amt.config import ConfigError, check, check_episode_sizes, load_schema
from amt.plan import Plan

ROOT = Path(__file__).parents[1]
SCHEMA = load_schema()
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())
PAPER = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())


def _set(path: str, value: object):
    def edit(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return edit


BAD = [
    ("partial configfile", lambda c: [c.pop(k) for k in list(c) if k != "evaluate"],
     r"(?s)A --configfile replaces the default.*--configfiles config.yaml overlay.yaml"),
    ("eps 4/0", _set("evaluate.attacks.0.eps", ["4/0"]),
     r"evaluate\.attacks\[0\]\.eps\[0\]: '4/0' is not a budget > 0"),
    ("eps 0", _set("evaluate.attacks.0.eps", [0]), r"evaluate\.attacks\[0\]\.eps\[0\]: 0 is less"),
    ("eps 0/255", _set("evaluate.attacks.0.eps", ["0/255"]),
     r"evaluate\.attacks\[0\]: eps: budget '0/255': expected a value in \(0, 1\]"),
    ("attack typo", _set("evaluate.attacks.0.stpes", 5),
     r"evaluate\.attacks\[0\]: unknown keys \['stpes'\]; allowed: .*'steps'"),
    ("uniform pool budget 4/0", _set("train.amt.budgets", ["1/255", "4/0"]),
     r"train\.amt\.budgets\[1\]: '4/0' is not a budget"),
    ("grid key typo", _set("evaluate.grids.amt.btea", [1]),
     r"evaluate\.grids\.amt: unknown keys \['btea'\]"),
    ("grid value", _set("evaluate.grids.amt.str", [{"layers": "fc2", "ratio": 0.5}]),
     r"evaluate\.grids\.amt\.str\[0\]"),
    ("grid key the method does not use", _set("evaluate.grids.pmf", {"beta": [1]}),
     r"evaluate\.grids\.pmf: keys \['beta'\] are unknown or not used by method pmf"),
    ("corruption name", _set("evaluate.corruptions.names", ["fog2"]),
     r"evaluate\.corruptions\.names\[0\]: 'fog2' is not one of \['gaussian_noise'"),
    ("setting typo", _set("settings.5w1s.shot", 1), r"settings\.5w1s: .*unknown keys \['shot'\]"),
    ("release of an unknown setting", _set("backbones.small_vit.release", {"5w2s": "r.pth"}),
     r"backbones\.small_vit\.release: unknown settings \['5w2s'\]"),
    ("amt_release without a release", lambda c: (
        c["evaluate"]["methods"].append("amt_release"),
        c["evaluate"]["grids"].update(amt_release={"beta": [1]})),
     r"evaluate\.methods: amt_release evaluates the authors' released pool; give its "
     r"checkpoint as backbones\.<backbone>\.release\.<setting>"),
    ("keep best without validation", lambda c: c["train"].pop("validation"),
     r"train\.keep: best needs validation episodes; add train\.validation"),
    ("an override keeps the best without validation",
     lambda c: (c["train"].pop("validation"),
                c["train"].update(keep="last", overrides={"pm": {"keep": "best"}})),
     r"train\.overrides\.pm\.keep: best needs validation episodes"),
    ("override key typo", _set("train.overrides", {"pm": {"lrr": 1.0e-5}}),
     r"train\.overrides\.pm: unknown keys \['lrr'\]; allowed: .*'lr'"),
    ("override of no trained method", _set("train.overrides", {"pmf": {"lr": 1.0e-5}}),
     r"train\.overrides: 'pmf' is not one of \['pm', 'lora', 'amt', 'styleadv'\]"),
    ("training episodes of no setting", _set("train.episodes", {"5w1s": "md_5w1s"}),
     r"train\.episodes: unknown settings \['md_5w1s'\]"),
    ("training episodes for an untrained setting", _set("train.episodes", {"1w1s": "5w1s"}),
     r"train\.episodes \(its keys: trained settings\): unknown settings \['1w1s'\]"),
    ("validation domain", _set("train.validation.domains", ["imagenet"]),
     r"train\.validation\.domains: unknown domains \['imagenet'\]"),
    ("schedule name", _set("train.schedule", "cosine"),
     r"train\.schedule: 'cosine' is not one of \['cosine_episode', 'cosine_epoch_timm'"),
    ("APSV rescaling", _set("train.amt.apsv_rescale", "tensor"),
     r"train\.amt\.apsv_rescale: 'tensor' is not one of \['layer', 'block'\]"),
]


@pytest.mark.parametrize(("edit", "message"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_config_gets_a_short_message_naming_the_key(edit, message: str) -> None:
    config = copy.deepcopy(DEFAULT)
    edit(config)
    with pytest.raises(ConfigError, match=message) as caught:
        check(config, SCHEMA)
    assert len(str(caught.value).splitlines()) <= 5


def test_more_shots_than_meta_dataset_classes_hold_is_rejected_without_the_data(
        tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no store: the class sizes come from Meta-Dataset's specs
    config = copy.deepcopy(PAPER)
    check_episode_sizes(Plan(config))
    config["settings"]["5w5s"]["shots"] = 100
    with pytest.raises(ConfigError, match=r"settings\.5w5s \(domain aircraft\).*split 'test' "
                                          r"has 0 classes with at least 115 images"):
        check_episode_sizes(Plan(config))


def test_paper_config_without_data_lists_every_missing_input_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "configs/paper.yaml",
         "-d", str(tmp_path), "-s", str(ROOT / "Snakefile")],
        capture_output=True, text=True, cwd=ROOT)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0 and elapsed < 60
    assert "23 inputs are missing" in output and "Building DAG" not in output
    assert Plan(PAPER).summary() in result.stderr  # jobs per rule and grid points, first
    for domain in PAPER["domains"]:
        assert f"domains.{domain}.raw: " in output
    for backbone in PAPER["backbones"]:
        assert f"backbones.{backbone}.checkpoint: " in output
    for setting in ("5w1s", "5w5s"):
        assert f"backbones.dino_vits16.release.{setting}: /models/metadataset_imagenet_" \
            f"advmetatuned_{setting}.pth does not exist\n  published in https://github.com/" \
            "xyang583/AMT/tree/main/checkpoints" in output
    assert "expected layout" in output and "github.com/brendenlake/omniglot" in output
    assert "https://dl.fbaipublicfiles.com/deit/" in output
