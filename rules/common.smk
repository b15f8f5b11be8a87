"""Helpers shared by every workflow file: config checks, paths and target lists."""

import json
import shlex
from fractions import Fraction
from pathlib import Path

from amt.config import check_config, raw_folder
from data_prep.sources import FETCHED

check_config(config)

RESULTS = "results"
MODELS = f"{RESULTS}/models"
TRAIN = config["train"]
AMT = TRAIN.get("amt", {"budgets": []})
POOL_STRATEGIES = AMT.get("pool_strategies", ["separate"])
DOMAINS = list(config["domains"])
EVAL_SETTINGS = config["evaluate"]["settings"]
EPISODE_KINDS = ["test", "valid"]
CONDA_ENV = "../envs/amt.yaml"  # relative to rules/; the environment of every rule


def convert_inputs(domain):
    """Files a conversion depends on: a fetched raw folder, and a split file if one is given."""
    spec = config["domains"][domain]
    inputs = [raw_folder(config, domain)] if spec["source"] in FETCHED else []
    if "split_file" in spec.get("options", {}):
        inputs.append(spec["options"]["split_file"])
    if "checksums" in spec:
        inputs.append(spec["checksums"])
    return inputs


def converter_options(domain):
    """Source-specific options as shell-quoted --option KEY=VALUE arguments."""
    options = config["domains"][domain].get("options", {})
    return " ".join(
        f"--option {shlex.quote(f'{key}={json.dumps(value)}')}"
        for key, value in options.items()
    )


def cli_options(mapping, exclude=()):
    """{"batch_size": 128} -> "--batch-size 128" for the keys not excluded."""
    return " ".join(
        f"--{key.replace('_', '-')} {shlex.quote(str(value))}"
        for key, value in mapping.items()
        if key not in exclude
    )


def pretrain_spec(backbone):
    return config["backbones"][backbone]["pretrain"]


def backbone_checkpoint(backbone):
    """The weights a backbone starts from: pretrained by the pipeline, or the user's file."""
    spec = config["backbones"][backbone]
    if "checkpoint" in spec:
        return spec["checkpoint"]
    return f"{RESULTS}/backbones/{backbone}/model.pt"


def train_stores():
    return [domain_file(d) for d in TRAIN["sources"]]


def setting_options(setting):
    """A named setting as the train command's --ways/--shots/--queries or --variable."""
    spec = config["settings"][setting]
    if spec.get("variable"):
        return "--variable"
    return cli_options(spec)


def train_options(setting):
    keys = ["epochs", "episodes_per_epoch", "lr", "warmup_epochs", "rank", "checkpoint_every"]
    schedule = {key: TRAIN[key] for key in keys if key in TRAIN}
    return (
        f"{setting_options(setting)} {cli_options(schedule)}"
        f" --seed {config['seed']} --device {config['device']}"
    )


def member_options(strategy, member):
    """Budget arguments of pool member `member` under a pool strategy (method.md):
    separate: one budget each; uniform: every member at the mean budget, own seed;
    random: a budget drawn per episode from the list, own seed."""
    budgets = AMT["budgets"]
    switches = " ".join(
        f"--{key.replace('_', '-')}" if AMT[key] else f"--no-{key.replace('_', '-')}"
        for key in ("apq", "apsv")
        if key in AMT
    )
    tuning = cli_options(AMT, exclude=["budgets", "pool_strategies", "apq", "apsv"])
    if strategy == "separate":
        budget = f"--budget {budgets[member]}"
    elif strategy == "uniform":
        mean = sum(Fraction(str(b)) for b in budgets) / len(budgets)
        budget = f"--budget {float(mean)!r} --seed {config['seed'] + member}"
    else:
        budget = f"--budget-choices {' '.join(map(str, budgets))} --seed {config['seed'] + member}"
    return f"{budget} {tuning} {switches}"


def pool_members(backbone, setting, strategy):
    return [
        f"{MODELS}/{backbone}/{setting}/amt_{strategy}/member{i}/model.pt"
        for i in range(len(AMT["budgets"]))
    ]


def model_targets():
    targets = []
    for backbone in TRAIN["backbones"]:
        for setting in TRAIN["settings"]:
            for method in TRAIN["methods"]:
                if method == "amt":
                    targets += [
                        f"{MODELS}/{backbone}/{setting}/amt_{strategy}/pool.pt"
                        for strategy in POOL_STRATEGIES
                    ]
                else:
                    targets.append(f"{MODELS}/{backbone}/{setting}/{method}/model.pt")
    return targets


def domain_file(domain):
    return f"{RESULTS}/data/{domain}.h5"


def episode_file(domain, kind, setting):
    return f"{RESULTS}/episodes/{domain}/{kind}_{setting}.json"


def setting_json(wildcards):
    return json.dumps(config["settings"][wildcards.setting], sort_keys=True)


def data_targets():
    return [f"{RESULTS}/data/{d}.inspect.json" for d in DOMAINS]


def episode_targets():
    return [
        episode_file(d, kind, s)
        for d in config["evaluate"]["targets"]
        for s in EVAL_SETTINGS
        for kind in EPISODE_KINDS
    ]


def all_targets():
    return data_targets() + episode_targets() + model_targets()
