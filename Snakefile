"""AMT benchmark: raw datasets -> HDF5 domains -> episodes -> LoRA pools -> results -> tables."""

from snakemake.utils import min_version, validate

min_version("9.0")


# The built-in default, unless the command line gives whole config files of its own
# (`--configfile configs/paper.yaml`); use `--configfiles config.yaml overlay.yaml` to extend it.
# `--config key=value` overrides keys of either.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    domain="|".join(DOMAINS),
    setting="|".join(config["settings"]),
    kind="test|valid",
    source="|".join(sorted(FETCHED)),
    backbone="|".join(config["backbones"]),
    strategy="separate|uniform|random",
    member="[0-9]+",
    method="[a-z_]+",


include: "rules/data.smk"
include: "rules/episodes.smk"
include: "rules/backbones.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
