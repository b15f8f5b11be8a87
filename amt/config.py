"""Checks of a pipeline configuration that a JSON schema cannot express (cross-references)."""

from __future__ import annotations

from data_prep.sources import FETCHED, SELF_CONTAINED


class ConfigError(ValueError):
    """A configuration value refers to something that does not exist."""


def _check_names(kind: str, key: str, names: list[str], allowed: list[str]) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ConfigError(f"config key {key}: unknown {kind} {unknown}; "
                          f"allowed: {sorted(allowed)}")


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
    _check_names("domains", "train.sources", train["sources"], list(domains))
    _check_names("backbones", "train.backbones", train["backbones"], list(backbones))
    _check_names("settings", "train.settings", train["settings"], settings)
    _check_names("domains", "evaluate.targets", config["evaluate"]["targets"], list(domains))
    _check_names("settings", "evaluate.settings", config["evaluate"]["settings"], settings)
    _check_names("evaluated methods", "evaluate.references",
                 config["evaluate"].get("references", []), config["evaluate"]["methods"])
    _check_grids(config["evaluate"])
    _check_pools(config["evaluate"], train)


def _check_pools(evaluate: dict, train: dict) -> None:
    """amt_pool_<strategy> evaluates the pool of that strategy, which training must build."""
    from amt.adapt import POOL_STRATEGY_METHODS

    trained = train.get("amt", {}).get("pool_strategies", ["separate"])
    for method in evaluate["methods"]:
        strategy = POOL_STRATEGY_METHODS.get(method)
        if strategy and strategy not in trained:
            raise ConfigError(f"config key evaluate.methods: {method} needs the {strategy!r} "
                              f"pool; add it to train.amt.pool_strategies (now {trained})")


def _check_grids(evaluate: dict) -> None:
    """Every evaluated method with test-time hyperparameters needs a grid to select them."""
    from amt.adapt import TUNED  # torch-heavy: only imported when a config is checked

    grids = evaluate.get("grids", {})
    _check_names("methods", "evaluate.grids", list(grids), list(TUNED))
    for method in evaluate["methods"]:
        if TUNED[method] and method not in grids:
            raise ConfigError(f"config key evaluate.grids.{method}: {method} has test-time "
                              f"hyperparameters {list(TUNED[method])}; give a grid to select "
                              "them on the validation episodes")


def budget_slug(budget: str | float) -> str:
    """A budget as it appears in paths: '4/255' -> '4-255'."""
    return str(budget).replace("/", "-")


def raw_folder(config: dict, domain: str) -> str | None:
    """The raw folder a domain converts from: configured, fetched into resources/, or none."""
    spec = config["domains"][domain]
    if "raw" in spec:
        return spec["raw"]
    if spec["source"] in FETCHED:
        return f"resources/{spec['source']}"
    return None
