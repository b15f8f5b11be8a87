"""The registry is the one place that names methods, strategies, attacks, corruptions and
backbones: the schema, the jobs, the workflow and the report must agree with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amt import registry
from amt.config import REGISTRY_ENUMS, load_schema
from amt.errors import UserError
from amt.registry import METHODS, SWEEPS, TRAINED, parse_budget, sweep_of
from data_prep.sources import SOURCES

ROOT = Path(__file__).parents[1]
SCHEMA = load_schema()
RAW = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())


def _registry_nodes(node: object) -> list[dict]:
    if isinstance(node, dict):
        found = [node] if "x-registry" in node else []
        return found + [n for value in node.values() for n in _registry_nodes(value)]
    return [n for value in node for n in _registry_nodes(value)] if isinstance(node, list) \
        else []


def _enums(node: object) -> list[list]:
    if isinstance(node, dict):
        return ([node["enum"]] if "enum" in node else []) + \
            [e for value in node.values() for e in _enums(value)]
    return [e for value in node for e in _enums(value)] if isinstance(node, list) else []


def test_the_schema_names_no_registered_name_itself():
    """Every enum of names in the schema comes from the registry: none is written there."""
    assert _enums(RAW) == []
    assert {n["x-registry"] for n in _registry_nodes(RAW)} == set(REGISTRY_ENUMS)


SCHEMA_ENUMS = [  # (what, where in the loaded schema, the registry's names)
    ("test-time methods", ("properties", "evaluate", "properties", "methods", "items"),
     list(METHODS)),
    ("trained methods", ("properties", "train", "properties", "methods", "items"), list(TRAINED)),
    ("attacks", ("properties", "evaluate", "properties", "attacks", "items", "properties",
                 "attack"), list(registry.ATTACKS)),
    ("backbones", ("properties", "backbones", "propertyNames"), list(registry.BACKBONES)),
    ("sources", ("properties", "domains", "additionalProperties", "properties", "source"),
     list(SOURCES)),
]


@pytest.mark.parametrize(("where", "names"), [case[1:] for case in SCHEMA_ENUMS],
                         ids=[case[0] for case in SCHEMA_ENUMS])
def test_every_schema_enum_equals_the_registry(where, names):
    node = SCHEMA
    for key in where:
        node = node[key]
    assert node["enum"] == names


def test_the_jobs_implement_exactly_the_registered_names():
    from amt.backbones import REMAPS
    from amt.conditions import TORCHATTACKS
    from amt.corruptions import CORRUPTIONS

    assert set(CORRUPTIONS) == set(registry.CORRUPTIONS)
    assert {e.family for e in registry.BACKBONES.values()} <= set(REMAPS)
    assert set(TORCHATTACKS) | {"pgd"} == set(registry.ATTACKS)
    from amt.transforms import BOXES

    assert set(BOXES) == set(registry.TEST_TRANSFORMS)


def test_every_method_the_report_names_exists():
    from amt.report.results import METHOD_LABELS
    from amt.report.tables import TABLES

    named = set(METHOD_LABELS) | {m for s in TABLES for m in (s.methods or ())} | \
        {s.anchor for s in TABLES if s.anchor}
    assert named <= set(METHODS), sorted(named - set(METHODS))


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_reads_a_trained_artefact_and_builds(name):
    entry = METHODS[name]
    assert entry.trained in TRAINED or entry.released
    assert entry.pooled == (entry.released or TRAINED[entry.trained].pooled)
    assert entry.strategy in registry.POOL_STRATEGIES
    assert entry.base is None or METHODS[entry.base].tuned
    assert (entry.combine is not None) == entry.pooled
    assert entry.combine is None or entry.combine in registry.COMBINE


@pytest.mark.parametrize(("name", "tuned"), [
    ("pm", ()), ("pmf", ("lr",)), ("amt", ("beta", "gamma", "top_k", "str_layers", "str_ratio")),
    ("amt_single_best", ("gamma", "str_layers", "str_ratio")), ("amt_no_ttm", ()),
    ("amt_weight_avg", ("str_layers", "str_ratio")), ("amt_logit_avg", ()),
    ("amt_release", ("beta", "gamma", "str_layers", "str_ratio")),
])
def test_the_hyperparameters_a_method_uses_follow_from_how_it_combines(name, tuned):
    assert METHODS[name].tuned == tuned


@pytest.mark.parametrize(("value", "expected"), [("4/255", 4 / 255), ("0.03", 0.03), (1, 1.0),
                                                 (0.5, 0.5)])
def test_one_budget_parser(value, expected):
    assert parse_budget(value, "k") == expected


@pytest.mark.parametrize(("value", "message"), [
    ("4/0", "non-zero denominator"), (0, r"expected a value in \(0, 1\]"), ("8", r"\(0, 1\]"),
    (True, "is not a number"), ("eight", "is not a number"), (float("nan"), r"\(0, 1\]"),
])
def test_bad_budgets_name_the_key(value, message):
    with pytest.raises(UserError, match=f"train.amt.budgets\\[0\\]: budget .*{message}"):
        parse_budget(value, "train.amt.budgets[0]")


def test_the_budget_is_parsed_in_one_place():
    """No module but the registry turns budget text into numbers (Fraction parsing)."""
    parsers = [path.relative_to(ROOT) for path in (ROOT / "amt").rglob("*.py")
               if "Fraction(" in path.read_text() and path.name not in ("registry.py",
                                                                         "plan.py")]
    assert parsers == []


def test_the_registry_and_the_plan_import_no_torch():
    code = "import sys, amt.registry, amt.plan, amt.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"



def test_a_sweeps_generated_names_resolve_to_their_familys_entries():
    sweep = SWEEPS["amt_lambda"]
    assert [sweep.name(v) for v in (1.0, 3, 0.5)] == ["amt_lambda_1", "amt_lambda_3",
                                                      "amt_lambda_0p5"]
    assert sweep_of("amt_lambda_0p5") == (sweep, 0.5) and sweep_of("amt_lambda") is None
    trained, method = TRAINED["amt_lambda_0p5"], METHODS["amt_lambda_0p5"]
    assert (trained.trainer, trained.pooled, dict(trained.switches)) == \
        ("amt", True, {"lambda_adv": 0.5})
    assert (method.trained, method.combine, method.trim, method.label) == \
        ("amt_lambda_0p5", "ttm", True, "AMT (λ_adv = 0.5)")
    assert "amt_lambda_3" in METHODS and "amt_lambda_x" not in METHODS
    assert "amt_lambda_3" not in list(METHODS)  # iteration: the written names only
    with pytest.raises(KeyError):
        METHODS["amt_lambda_3x"]


def test_the_wildcard_patterns_match_generated_names_and_only_their_kind():
    pooled = TRAINED.pattern(lambda e: e.pooled)
    assert re.fullmatch(pooled, "amt_lambda_0p5") and re.fullmatch(pooled, "amt_no_apq")
    assert not re.fullmatch(pooled, "amt_lambda") and not re.fullmatch(pooled, "amt_single")
    assert re.fullmatch(TRAINED.pattern(lambda e: not e.pooled), "amt_single")
    assert re.fullmatch(METHODS.pattern(lambda e: e.merges), "amt_lambda_9")
    assert re.fullmatch(METHODS.pattern(lambda e: not e.merges), "amt_linear")
