"""Helpers shared by every workflow file: config checks, paths and target lists."""

import json
import shlex
from fractions import Fraction
from pathlib import Path

from amt.config import check_episode_sizes, check_inputs, exit_on_error, raw_folder
from data_prep.sources import FETCHED

RESULTS = "results"
MODELS = f"{RESULTS}/models"
TRAIN = config["train"]

# Data preparation (fetch, convert, episodes) goes first whenever cores free up: it is seconds of
# work that every later job waits on, and without a priority the scheduler may leave a 2-thread
# conversion for last (measured: a domain's 12 jobs pushed to the end, 30 s on the whole run).
DATA_PRIORITY = 50

AMT = TRAIN.get("amt", {"budgets": []})
POOL_STRATEGIES = AMT.get("pool_strategies", ["separate"])
DOMAINS = list(config["domains"])
EVAL_SETTINGS = config["evaluate"]["settings"]
EPISODE_KINDS = ["test", "valid"]


def scaled(base):
    """A resource that grows with each attempt: a job retried after running out of time or memory
    asks for twice, then three times, as much (a retried training resumes from its checkpoint)."""
    return lambda wildcards, attempt: base * attempt


def cpus_per_gpu(wildcards, threads):
    """A GPU rule's CPUs, asked of Slurm per GPU (--cpus-per-gpu): its threads."""
    return threads


def loader_workers(wildcards, threads):
    """Data-loading processes of a GPU rule: on a GPU the job's other CPUs load episodes; on the
    CPU they would compete with the computation for the same cores, so none."""
    return threads - 1 if str(config["device"]).startswith("cuda") else 0


def convert_inputs(domain):
    """Files a conversion depends on: its raw folder (fetched or the user's), and the split and
    checksum files if given."""
    spec = config["domains"][domain]
    raw = raw_folder(config, domain)
    inputs = [raw] if raw else []
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
    return f"{setting_options(setting)} {cli_options(schedule)} --device {config['device']}"


def member_options(strategy, member):
    """Budget arguments of pool member `member` under a pool strategy (method.md):
    separate: one budget each; uniform: every member at the mean budget, own seed;
    random: every member draws a budget from the list per episode, own seed."""
    budgets = AMT["budgets"]
    switches = " ".join(
        f"--{key.replace('_', '-')}" if AMT[key] else f"--no-{key.replace('_', '-')}"
        for key in ("apq", "apsv")
        if key in AMT
    )
    tuning = cli_options(AMT, exclude=["budgets", "pool_strategies", "apq", "apsv"])
    if strategy == "separate":
        budget = f"--budget {budgets[member]} --seed {config['seed']}"
    elif strategy == "random":
        budget = f"--budget-choices {' '.join(map(str, budgets))} --seed {config['seed'] + member}"
    else:
        mean = sum(Fraction(str(b)) for b in budgets) / len(budgets)
        budget = f"--budget {float(mean)!r} --seed {config['seed'] + member}"
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


def training_logs():
    """Every train_log.csv the trained models leave: pretraining, baselines, pool members."""
    logs = [
        f"{RESULTS}/backbones/{b}/train_log.csv"
        for b in TRAIN["backbones"]
        if "pretrain" in config["backbones"][b]
    ]
    for backbone in TRAIN["backbones"]:
        for setting in TRAIN["settings"]:
            for method in TRAIN["methods"]:
                if method != "amt":
                    logs.append(f"{MODELS}/{backbone}/{setting}/{method}/train_log.csv")
                    continue
                logs += [
                    str(Path(member).with_name("train_log.csv"))
                    for strategy in POOL_STRATEGIES
                    for member in pool_members(backbone, setting, strategy)
                ]
    return logs


EVALUATE = config["evaluate"]
EVAL_BACKBONES = TRAIN["backbones"]
POOL_METHODS = ("amt", "amt_ft", "amt_no_str", "amt_single_best", "amt_weight_avg",
                "amt_no_ttm", "amt_logit_avg", "amt_pool_uniform", "amt_pool_random")


def eval_model(backbone, setting, method):
    """The trained file a test-time method starts from: amt_pool_<strategy> the pool of that
    strategy, the other amt methods the separate pool."""
    if method in POOL_METHODS:
        strategy = method.removeprefix("amt_pool_") if method.startswith("amt_pool_") else "separate"
        return f"{MODELS}/{backbone}/{setting}/amt_{strategy}/pool.pt"
    trained = "lora" if method == "lora" else "pm"
    return f"{MODELS}/{backbone}/{setting}/{trained}/model.pt"


def selection_file(backbone, setting, domain, method):
    if method not in EVALUATE.get("grids", {}):
        return []
    return f"{RESULTS}/selection/{backbone}/{setting}/{domain}/{method}.json"


def base_selection(backbone, setting, domain, method):
    """amt_ft fine-tunes AMT's merged model: it reuses amt's merging choice."""
    return selection_file(backbone, setting, domain, "amt") if method == "amt_ft" else []


def image_options():
    episodes = config["episodes"]
    return cli_options({k: episodes[k] for k in ("image_size", "resize") if k in episodes})


def domain_options(domain):
    spec = config["domains"][domain]
    benchmark = spec.get("benchmark", EVALUATE.get("benchmark", "builtin"))
    in_domain = "--in-domain" if domain in TRAIN["sources"] else "--no-in-domain"
    return f"--benchmark {shlex.quote(benchmark)} --domain {domain} {in_domain}"


def eval_targets():
    return [
        f"{RESULTS}/eval/{b}/{s}/{d}/{m}.csv"
        for b in EVAL_BACKBONES
        for s in EVAL_SETTINGS
        for d in EVALUATE["targets"]
        for m in EVALUATE["methods"]
    ]


def spectra_files(rows):
    """Merging methods write spectra beside their rows; the figure shows those of the first
    backbone and setting (spectra rows are keyed by domain and method only)."""
    first = f"{RESULTS}/eval/{EVAL_BACKBONES[0]}/{EVAL_SETTINGS[0]}/"
    spectra = [row.replace(".csv", ".spectra.csv") for row in rows if row.startswith(first)]
    present = [path for path in spectra if Path(path).exists()]
    return f"--spectra {' '.join(present)}" if present else ""


def sanity_files(rows):
    """Every evaluation job writes its sanity checks beside its rows."""
    return [row.replace(".csv", ".sanity.json") for row in rows]


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
    return (
        data_targets()
        + episode_targets()
        + model_targets()
        + [f"{RESULTS}/tables", f"{RESULTS}/figures"]
    )


def backbone_models(backbone):
    """The models trained from a backbone's weights (its checkpoint is needed while any is
    missing)."""
    return [target for target in model_targets() if target.startswith(f"{MODELS}/{backbone}/")]


# Before the DAG: one message for every missing input, and episode settings too large for the
# classes of a domain whose sizes are known (its store, or Meta-Dataset's spec).
exit_on_error(check_inputs, config, domain_file, backbone_models)
exit_on_error(check_episode_sizes, config, domain_file)
