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
    _check_names("domains", "evaluate.targets", config["evaluate"]["targets"], list(domains))
    _check_names("settings", "evaluate.settings", config["evaluate"]["settings"],
                 list(config["settings"]))


def raw_folder(config: dict, domain: str) -> str | None:
    """The raw folder a domain converts from: configured, fetched into resources/, or none."""
    spec = config["domains"][domain]
    if "raw" in spec:
        return spec["raw"]
    if spec["source"] in FETCHED:
        return f"resources/{spec['source']}"
    return None
