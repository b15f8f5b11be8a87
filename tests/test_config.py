"""The configuration schema and the cross-reference checks run when the workflow starts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from amt.config import ConfigError, check_config, load_schema
from amt.plan import Plan
from data_prep.sources import SOURCES

ROOT = Path(__file__).parents[1]
SCHEMA = load_schema()
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def errors(config: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [error.message for error in validator.iter_errors(config)]


def test_default_config_is_valid() -> None:
    assert errors(DEFAULT) == []
    check_config(DEFAULT)


def test_schema_lists_exactly_the_registered_sources() -> None:
    enum = SCHEMA["properties"]["domains"]["additionalProperties"]["properties"]["source"]["enum"]
    assert sorted(enum) == sorted(SOURCES)


def test_unknown_key_is_named() -> None:
    config = copy.deepcopy(DEFAULT)
    config["episodes"]["tests"] = {"count": 3, "seed": 0}
    assert any("'tests' was unexpected" in message for message in errors(config))


def test_wrong_type_is_reported() -> None:
    config = copy.deepcopy(DEFAULT)
    config["episodes"]["test"]["count"] = "many"
    assert any("'many' is not of type 'integer'" in message for message in errors(config))


def test_unknown_source_lists_the_allowed_ones() -> None:
    config = copy.deepcopy(DEFAULT)
    config["domains"]["glyphs"]["source"] = "omniglott"
    message = " ".join(errors(config))
    assert "'omniglott' is not one of" in message and "'omniglot'" in message


def test_unknown_target_domain_names_key_and_allowed_values() -> None:
    config = copy.deepcopy(DEFAULT)
    config["evaluate"]["targets"].append("imagenet")
    with pytest.raises(ConfigError, match=r"evaluate\.targets.*'imagenet'.*allowed.*'glyphs'"):
        check_config(config)


def test_reference_must_be_an_evaluated_method() -> None:
    config = copy.deepcopy(DEFAULT)
    config["evaluate"]["references"] = ["pm", "pmf"]
    with pytest.raises(ConfigError,
                       match=r"evaluate\.references.*\['pmf'\].*allowed.*'amt', 'lora', 'pm'"):
        check_config(config)


def test_unknown_setting_is_rejected() -> None:
    config = copy.deepcopy(DEFAULT)
    config["evaluate"]["settings"] = ["5w10s"]
    with pytest.raises(ConfigError, match=r"evaluate\.settings.*5w10s"):
        check_config(config)


def test_real_source_without_raw_folder_is_rejected() -> None:
    config = copy.deepcopy(DEFAULT)
    config["domains"]["omniglot"] = {"source": "omniglot"}
    with pytest.raises(ConfigError, match=r"domains\.omniglot\.raw"):
        check_config(config)


def test_raw_folder_of_fetched_and_configured_sources() -> None:
    config = copy.deepcopy(DEFAULT)
    config["domains"]["omniglot"] = {"source": "omniglot", "raw": "/data/omniglot"}
    plan = Plan(config)
    assert plan.raw_folder("mnist") == "resources/mnist"
    assert plan.raw_folder("glyphs") is None
    assert plan.raw_folder("omniglot") == "/data/omniglot"


def test_workflow_stops_on_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = copy.deepcopy(DEFAULT)
    config["seed"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "-d", str(tmp_path),
         "-s", str(ROOT / "Snakefile")],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "seed" in output and "-1 is less than the minimum of 0" in output


def test_unknown_training_backbone_is_rejected() -> None:
    config = copy.deepcopy(DEFAULT)
    config["train"]["backbones"] = ["dino_vits16"]
    with pytest.raises(ConfigError, match=r"train\.backbones.*dino_vits16.*allowed.*small_vit"):
        check_config(config)


def test_pretrain_domain_must_exist() -> None:
    config = copy.deepcopy(DEFAULT)
    config["backbones"]["small_vit"]["pretrain"]["domain"] = "omniglot"
    with pytest.raises(ConfigError, match=r"backbones\.small_vit\.pretrain\.domain"):
        check_config(config)


def test_backbone_needs_exactly_one_weight_origin() -> None:
    config = copy.deepcopy(DEFAULT)
    config["backbones"]["small_vit"]["checkpoint"] = "/models/x.pth"
    assert errors(config)
    config["backbones"]["small_vit"] = {}
    assert errors(config)


def test_budget_strings_are_checked() -> None:
    config = copy.deepcopy(DEFAULT)
    config["train"]["amt"]["budgets"] = ["8/255", "eight"]
    assert any("eight" in message for message in errors(config))


def test_pool_ablation_needs_its_pool_trained() -> None:
    config = copy.deepcopy(DEFAULT)
    config["evaluate"]["methods"].append("amt_pool_random")
    config["evaluate"]["grids"]["amt_pool_random"] = config["evaluate"]["grids"]["amt"]
    with pytest.raises(ConfigError, match=r"amt_pool_random needs the 'random' pool.*"
                                          r"train\.amt\.pool_strategies"):
        check_config(config)
    config["train"]["amt"]["pool_strategies"] = ["separate", "random"]
    check_config(config)


def _dry_run(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", *args, "-d", str(tmp_path),
         "-s", str(ROOT / "Snakefile")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_configfile_replaces_the_default_and_config_overrides_it(tmp_path: Path) -> None:
    own = copy.deepcopy(DEFAULT)
    own["seed"] = 5
    for name in ("animals", "digits"):  # a config of its own without these domains
        del own["domains"][name]
        own["evaluate"]["targets"].remove(name)
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(own))
    output = _dry_run(tmp_path, "--configfile", str(path))
    assert '"seed":5' in output and "convert_digits" not in output  # not merged into the default
    output = _dry_run(tmp_path, "--config", "seed=7")
    assert '"seed":7' in output and "convert_digits" in output  # the default, one key overridden
