"""AMT benchmark: raw datasets -> HDF5 domains -> episodes -> LoRA pools -> results -> tables."""

import os
import sys

from snakemake.utils import min_version

from amt.config import check, exit_on_error, load_schema

min_version("9.0")


# The built-in default, unless the command line gives whole config files of its own
# (`--configfile configs/paper.yaml`); use `--configfiles config.yaml overlay.yaml` to extend it.
# `--config key=value` overrides keys of either.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config.yaml"


# Checked before anything is planned: a bad key or value ends the run with a short message
# naming it. The plan (amt/plan.py) then says which jobs exist and what each one gets.
PLAN = exit_on_error(check, config, load_schema())
if workflow.is_main_process:  # not again in each job a cluster executor starts
    print(PLAN.summary(), file=sys.stderr)

# Many jobs read the same HDF5 stores at once; HDF5's file locks fail or hang on NFS and Lustre,
# and readers need none (a store is written once, to a .partial file, then renamed). Every job,
# local or submitted (Slurm's --export=ALL), inherits this.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


include: "rules/common.smk"


wildcard_constraints:
    **WILDCARDS,


include: "rules/data.smk"
include: "rules/episodes.smk"
include: "rules/backbones.smk"
include: "rules/train.smk"
include: "rules/release.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        PLAN.targets(),
    default_target: True
