"""Checks of a pipeline configuration, run by the workflow before it plans a single job: the
schema (short messages), cross-references, the jobs' own parsers of attacks, budgets, grids and
settings, episode sizes against the class sizes known up front, and the user's input files."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from amt import registry
from amt.episodes import FixedSampler, sampler_from_setting
from amt.plan import DEFAULT_STRATEGIES, Plan, path
from amt.registry import METHODS, RELEASE_PUBLISHED, backbone_entry, parse_budget
from amt.specs import (
    CorruptionSpec,
    SanitySpec,
    StatsOptions,
    build,
    grid_points,
    parse_attacks,
)
from data_prep.convert import CODECS
from data_prep.sources import FETCHED, SELF_CONTAINED, SOURCES, source_module

ROOT = Path(__file__).resolve().parents[1]
DATASET_DOCS = ("docs/datasets.md", "docs/datasets_cross_domain.md")


class ConfigError(ValueError):
    """A configuration value is malformed, refers to something that does not exist, or names
    an input that is missing."""


def exit_on_error(check: Callable[..., object], *args: object) -> object:
    """Run a check at workflow start and return its result; a ConfigError ends Snakemake with
    its message only."""
    try:
        return check(*args)
    except ConfigError as err:
        sys.exit(f"Configuration error:\n{err}")


# -- schema ---------------------------------------------------------------------------------------
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
# The schema's `x-registry: NAME` nodes take their enum from here, so that no name is written
# twice (a new method is a registry entry, not also a schema edit).
REGISTRY_ENUMS: dict[str, list] = {
    "methods": list(registry.METHODS),
    "tuned_methods": [m for m, entry in registry.METHODS.items() if entry.tuned],
    "trained": list(registry.TRAINED),
    "pool_strategies": list(registry.POOL_STRATEGIES),
    "attacks": list(registry.ATTACKS),
    "norms": list(registry.NORMS),
    "corruptions": list(registry.CORRUPTIONS),
    "severities": list(registry.SEVERITIES),
    "str_layers": [name for name in registry.STR_LAYERS if name != "none"],
    "kl_directions": list(registry.KL_DIRECTIONS),
    "str_solvers": list(registry.STR_SOLVERS),
    "score_precisions": list(registry.SCORE_PRECISIONS),
    "test_transforms": list(registry.TEST_TRANSFORMS),
    "pos_embeds": list(registry.POS_EMBEDS),
    "average_cis": list(registry.AVERAGE_CIS),
    "codecs": list(CODECS),
    "optimizers": list(registry.OPTIMIZERS),
    "schedules": list(registry.SCHEDULES),
    "keep": list(registry.KEEP),
    "apsv_rescale": list(registry.APSV_RESCALE),
    "apsv_loss_support": list(registry.APSV_LOSS_SUPPORT),
    "backbones": list(registry.BACKBONES),
    "sources": list(SOURCES),
}


def load_schema(path: Path = SCHEMA) -> dict:
    """The config schema with every ``x-registry`` node's enum filled in from the registry."""
    schema = yaml.safe_load(Path(path).read_text())

    def fill(node: object) -> None:
        if isinstance(node, dict):
            if "x-registry" in node:
                node["enum"] = REGISTRY_ENUMS[node["x-registry"]]
            for value in node.values():
                fill(value)
        elif isinstance(node, list):
            for value in node:
                fill(value)

    fill(schema)
    return schema


def validate_schema(config: dict, schema: dict) -> None:
    """Raise ConfigError with one line per problem: the key path, the bad value, what is allowed.
    A config missing required top-level keys is most likely an overlay given as --configfile."""
    missing = [key for key in schema["required"] if key not in config]
    if missing:
        raise ConfigError(
            f"the config has no {', '.join(missing)}. A --configfile replaces the default config "
            "as a whole; to change a few keys of it, give both files:\n"
            "  snakemake --configfiles config.yaml overlay.yaml   (the later file wins)\n"
            "or single keys with --config key=value.")
    validator = jsonschema.Draft202012Validator(schema)
    problems = [_describe(jsonschema.exceptions.best_match([error]))
                for error in validator.iter_errors(config)]
    if problems:
        raise ConfigError("\n".join(sorted(set(problems))))


def _describe(error: jsonschema.ValidationError) -> str:
    return f"config key {_key(error.absolute_path)}: {_reason(error)}"


def _key(path) -> str:
    """('evaluate', 'attacks', 0, 'eps') -> 'evaluate.attacks[0].eps'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def _reason(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        return f"unknown keys {unexpected}; allowed: {allowed}"
    if error.validator == "pattern" and "description" in error.schema:
        return f"{error.instance!r} is not {error.schema['description']}"
    if error.validator in ("oneOf", "anyOf") and error.context:
        forms = sorted({_reason(sub) for sub in error.context})
        return f"{_short(error.instance)} fits none of the allowed forms: {' | '.join(forms)}"
    return error.message if len(error.message) <= 300 else error.message[:300] + " ..."


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + " ..."


# -- cross-references and the jobs' own parsers ---------------------------------------------------
def _check_names(kind: str, key: str, names: list[str], allowed: list[str]) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ConfigError(f"config key {key}: unknown {kind} {unknown}; "
                          f"allowed: {sorted(allowed)}")


def check(config: dict, schema: dict) -> Plan:
    """Everything a job would reject about ``config`` itself (not its input files); returns
    the plan, every job's spec built and checked."""
    validate_schema(config, schema)
    check_config(config)
    return _plan_with_specs(config)


def check_config(config: dict) -> None:
    """Raise ConfigError naming the key and the allowed values for any dangling reference."""
    domains = config["domains"]
    for name, spec in domains.items():
        builtin = spec["source"] in FETCHED | SELF_CONTAINED
        if not builtin and "raw" not in spec:
            raise ConfigError(f"config key domains.{name}.raw: source {spec['source']!r} is not "
                              "built in; set raw to the folder holding its unpacked download")
    settings, backbones, train = list(config["settings"]), config["backbones"], config["train"]
    for name, spec in backbones.items():
        if "pretrain" in spec:
            _check_names("domains", f"backbones.{name}.pretrain.domain",
                         [spec["pretrain"]["domain"]], list(domains))
        _check_names("settings", f"backbones.{name}.release", list(spec.get("release", {})),
                     settings)
    _check_names("domains", "train.sources", train["sources"], list(domains))
    _check_names("backbones", "train.backbones", train["backbones"], list(backbones))
    _check_names("settings", "train.settings", train["settings"], settings)
    _check_names("domains", "evaluate.targets", config["evaluate"]["targets"], list(domains))
    _check_names("settings", "evaluate.settings", config["evaluate"]["settings"], settings)
    _check_names("evaluated methods", "evaluate.references",
                 config["evaluate"].get("references", []), config["evaluate"]["methods"])
    _check_names("settings", "evaluate.settings (models are trained for train.settings)",
                 config["evaluate"]["settings"], train["settings"])
    _check_training(train, list(domains), settings)
    _check_grids(config["evaluate"])
    _check_trained(config["evaluate"], train)
    _check_release(config)
    _parse_values(config)


def _check_training(train: dict, domains: list[str], settings: list[str]) -> None:
    """train.episodes maps trained settings to settings; validation names domains, and keeping
    the best epoch needs it."""
    episodes = train.get("episodes", {})
    _check_names("settings", "train.episodes (its keys: trained settings)", list(episodes),
                 train["settings"])
    _check_names("settings", "train.episodes", list(episodes.values()), settings)
    validation = train.get("validation")
    if validation is not None:
        _check_names("domains", "train.validation.domains", validation.get("domains", []),
                     domains)
    overrides = train.get("overrides", {})
    keeping_best = [f"train.overrides.{name}.keep" for name, o in overrides.items()
                    if o.get("keep") == "best"] + (["train.keep"] * (train.get("keep") == "best"))
    if keeping_best and validation is None:
        raise ConfigError(f"config key {keeping_best[0]}: best needs validation episodes; add "
                          "train.validation: {count: N, seed: S} (domains: default "
                          "train.sources)")


def _parse_values(config: dict) -> None:
    """The jobs' own parsers on each value as the config writes it, so that a message names
    the config key."""
    evaluate = config["evaluate"]
    try:
        for name, setting in config["settings"].items():
            _with_key(f"settings.{name}", sampler_from_setting, setting)
        for i, value in enumerate(config["train"].get("amt", {}).get("budgets", [])):
            parse_budget(value, f"train.amt.budgets[{i}]")
        parse_attacks(evaluate.get("attacks", []), "evaluate.attacks")
        build(CorruptionSpec, evaluate.get("corruptions", {}), "evaluate.corruptions")
        build(SanitySpec, evaluate.get("sanity", {}), "evaluate.sanity")
        for method, grid in evaluate.get("grids", {}).items():
            grid_points(grid, method, f"evaluate.grids.{method}")
        build(StatsOptions, config.get("report", {}), "report")
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None


def _plan_with_specs(config: dict) -> Plan:
    """The plan, after building every job's spec: what the config's keys could not say (a
    training key a run rejects, say) is named with the job."""
    plan = Plan(config)
    try:
        plan.specs()
    except ValueError as err:
        raise ConfigError(f"a job's spec: {err}") from None
    return plan


def _with_key(key: str, parse: Callable[[object], object], value: object) -> None:
    try:
        parse(value)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def _check_trained(evaluate: dict, train: dict) -> None:
    """Each evaluated method reads a trained artefact that training must build: its trained
    method, and for a method over amt's pools the pool of its strategy (the trained ablations
    always train AMT's own, separate)."""
    strategies = train.get("amt", {}).get("pool_strategies", list(DEFAULT_STRATEGIES))
    for method in evaluate["methods"]:
        entry = METHODS[method]
        if entry.released:
            continue  # imported, not trained: _check_release
        if entry.trained not in train["methods"]:
            raise ConfigError(f"config key evaluate.methods: {method} reads the "
                              f"{entry.trained!r} models; add it to train.methods (now "
                              f"{train['methods']})")
        if entry.pooled and entry.trained == "amt" and entry.strategy not in strategies:
            raise ConfigError(f"config key evaluate.methods: {method} needs the "
                              f"{entry.strategy!r} pool; add it to train.amt.pool_strategies "
                              f"(now {strategies})")


def _check_release(config: dict) -> None:
    """A method over the authors' released pool needs its checkpoint for some trained backbone
    and evaluated setting (it is evaluated wherever one is given)."""
    released = [m for m in config["evaluate"]["methods"] if METHODS[m].released]
    given = [(b, s) for b in config["train"]["backbones"] for s in config["evaluate"]["settings"]
             if s in config["backbones"][b].get("release", {})]
    if released and not given:
        raise ConfigError(f"config key evaluate.methods: {released[0]} evaluates the authors' "
                          "released pool; give its checkpoint as backbones.<backbone>.release."
                          "<setting> for a backbone in train.backbones and a setting in "
                          f"evaluate.settings (published in {RELEASE_PUBLISHED})")


def _check_grids(evaluate: dict) -> None:
    """Every evaluated method with test-time hyperparameters needs a grid to select them."""
    grids = evaluate.get("grids", {})
    _check_names("methods with test-time hyperparameters", "evaluate.grids", list(grids),
                 [m for m, entry in METHODS.items() if entry.tuned])
    for method in evaluate["methods"]:
        tuned = METHODS[method].tuned
        if tuned and method not in grids:
            raise ConfigError(f"config key evaluate.grids.{method}: {method} has test-time "
                              f"hyperparameters {list(tuned)}; give a grid to select them on "
                              "the validation episodes")


# -- episode sizes --------------------------------------------------------------------------------
class _SpecSizes:
    """Class sizes of a Meta-Dataset source as its published dataset spec gives them, in the
    store's shape (class ids train -> valid -> test), for the samplers' own checks."""

    def __init__(self, source: str) -> None:
        from data_prep.sources.metadataset_common import reference_spec
        from data_prep.store import SPLITS

        spec = reference_spec(source)
        self.path = f"{source} (Meta-Dataset's dataset spec)"
        self.class_sizes = np.array([spec.images[name] for name in spec.class_names])
        ends = np.cumsum([spec.split_counts[split] for split in SPLITS])
        self._ranges = {split: np.arange(end - spec.split_counts[split], end)
                        for split, end in zip(SPLITS, ends, strict=True)}

    def classes_in_split(self, split: str) -> np.ndarray:
        return self._ranges[split]


def _class_sizes(source: str, store: Path):
    """What knows the domain's class sizes before its episodes are drawn: the converted store,
    else a Meta-Dataset source's spec; None where neither exists yet."""
    from data_prep.store import DomainStore

    if store.exists():
        return DomainStore(store)
    try:
        return _SpecSizes(source)
    except FileNotFoundError:
        return None


def check_episode_sizes(plan: Plan) -> None:
    """Every fixed setting needs `ways` classes with shots + queries images in the split its
    episodes come from: test for the evaluated targets (validation episodes fall back to it),
    train for the training sources, valid for the training runs' validation domains. Checked
    with the sampler's own check where the class sizes are known; other domains fail when their
    episodes are drawn."""
    config = plan.config
    uses = [(d, s, "test") for d in config["evaluate"]["targets"]
            for s in config["evaluate"]["settings"]]
    trained = [plan.train_setting(s) for s in config["train"]["settings"]]
    uses += [(d, s, "train") for d in config["train"]["sources"] for s in trained]
    uses += [(d, s, "valid") for d in plan.validation_domains for s in trained]
    problems, known = [], {}
    for domain, setting, split in uses:
        sampler = sampler_from_setting(config["settings"][setting])
        if not isinstance(sampler, FixedSampler):
            continue
        if domain not in known:
            known[domain] = _class_sizes(config["domains"][domain]["source"],
                                         Path(path("store", domain=domain)))
        if known[domain] is None:
            continue
        try:
            sampler.check(known[domain], split)
        except ValueError as err:
            problems.append(f"config key settings.{setting} (domain {domain}): {err}")
    if problems:
        raise ConfigError("\n".join(problems))


# -- input files ----------------------------------------------------------------------------------
def check_inputs(plan: Plan) -> None:
    """One error listing every user-supplied input that is missing where a job needs it: raw
    folders of domains not yet converted, their split and checksum files, the official
    checkpoints of backbones with models still to train, and the authors' released checkpoints
    not yet imported."""
    config, missing = plan.config, []
    for name, spec in config["domains"].items():
        if Path(path("store", domain=name)).exists():
            continue
        if "raw" in spec and not Path(spec["raw"]).exists():
            missing.append(_raw_entry(name, spec))
        for key, file in (("checksums", spec.get("checksums")),
                          ("options.split_file", spec.get("options", {}).get("split_file"))):
            if file and not Path(file).exists():
                missing.append(f"domains.{name}.{key}: {file} does not exist")
    for name in config["train"]["backbones"]:
        file = config["backbones"][name].get("checkpoint")
        trained = all(Path(model).exists() for model in plan.backbone_models(name))
        if file and not Path(file).exists() and not trained:
            missing.append(_checkpoint_entry(name, file))
    for job in plan.releases():
        file = plan.release_checkpoint(**job)
        if not Path(file).exists() and not Path(path("release_pool", **job)).exists():
            missing.append(f"backbones.{job['backbone']}.release.{job['setting']}: {file} does "
                           f"not exist\n  published in {RELEASE_PUBLISHED}")
    if missing:
        raise ConfigError(f"{len(missing)} inputs are missing; nothing was planned or run. "
                          "Put them in place or change the paths in the config:\n\n"
                          + "\n\n".join(missing))


def _raw_entry(domain: str, spec: dict) -> str:
    source = spec["source"]
    layout = "\n".join(f"    {line}" for line in source_module(source).LAYOUT.splitlines())
    entry = (f"domains.{domain}.raw: {spec['raw']} does not exist (source {source})\n"
             f"  expected layout:\n{layout}")
    download = published_download(source)
    return entry + (f"\n  download: {download}" if download else "")


def _checkpoint_entry(backbone: str, path: str) -> str:
    return (f"backbones.{backbone}.checkpoint: {path} does not exist\n"
            f"  official file: {backbone_entry(backbone).published}")


def published_download(source: str) -> str | None:
    """The **Download** paragraph of a source's section in the dataset docs, with the doc's
    name; None for a source without one (image_folder: the user's own images)."""
    heading = re.compile(rf"^#{{2,3}} ({re.escape(source)}\b|.*`source: {re.escape(source)}`)")
    for doc in DATASET_DOCS:
        path = ROOT / doc
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        starts = [i for i, line in enumerate(lines) if heading.match(line)]
        if starts:
            return _download_paragraph(lines[starts[0] + 1:], doc, source)
    return None


def _download_paragraph(lines: list[str], doc: str, source: str) -> str | None:
    text: list[str] = []
    for line in lines:
        if line.startswith("#") or (text and (line.startswith("- **") or not line.strip())):
            break
        if line.startswith("- **Download**:"):
            text.append(line.removeprefix("- **Download**:"))
        elif text:
            text.append(line)
    if not text:
        return None
    return f"{' '.join(' '.join(text).split())} ({doc}, section {source})"
