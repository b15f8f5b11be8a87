"""Helpers shared by every workflow file: config checks, paths and target lists."""

import json
import shlex

from amt.config import check_config, raw_folder
from data_prep.sources import FETCHED

check_config(config)

RESULTS = "results"
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
    return inputs


def converter_options(domain):
    """Source-specific options as shell-quoted --option KEY=VALUE arguments."""
    options = config["domains"][domain].get("options", {})
    return " ".join(
        f"--option {shlex.quote(f'{key}={json.dumps(value)}')}"
        for key, value in options.items()
    )


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
    return data_targets() + episode_targets()
