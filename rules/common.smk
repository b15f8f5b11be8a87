"""The rules' shim over the plan (amt/plan.py): paths, wildcards, resources, the input checks."""

from pathlib import Path

from amt.config import check_episode_sizes, check_inputs, exit_on_error
from amt.plan import PATHS, benchmark, log, path
from amt.registry import EPISODE_KINDS, METHODS, POOL_STRATEGIES, TRAINED
from amt.specs import to_json
from data_prep.sources import FETCHED

# Data preparation (fetch, convert, episodes) goes first whenever cores free up: it is seconds of
# work that every later job waits on, and without a priority the scheduler may leave a 2-thread
# conversion for last (measured: a domain's 12 jobs pushed to the end, 30 s on the whole run).
DATA_PRIORITY = 50

WILDCARDS = {
    "domain": "|".join(PLAN.domains),
    "setting": "|".join(config["settings"]),
    "kind": "|".join(EPISODE_KINDS),
    "source": "|".join(sorted(FETCHED)),
    "backbone": "|".join(config["backbones"]),
    "trained": "|".join(TRAINED),
    "strategy": "|".join(POOL_STRATEGIES),
    "member": "[0-9]+",
    "seed": "[0-9]+",
    "method": "|".join(METHODS),
}
BASELINES = "|".join(name for name, entry in TRAINED.items() if not entry.pooled)
POOLED = "|".join(name for name, entry in TRAINED.items() if entry.pooled)
MERGING = "|".join(name for name, entry in METHODS.items() if entry.merges)
NOT_MERGING = "|".join(name for name, entry in METHODS.items() if not entry.merges)


def evaluation(wildcards):
    """(backbone, setting, domain, method, seed) of a selection or evaluation job."""
    return (wildcards.backbone, wildcards.setting, wildcards.domain, wildcards.method,
            int(wildcards.seed))


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
    return threads - 1 if str(config.get("device", "auto")).startswith("cuda") else 0


# Before the DAG: one message for every missing input, and episode settings too large for the
# classes of a domain whose sizes are known (its store, or Meta-Dataset's spec).
exit_on_error(check_inputs, PLAN)
exit_on_error(check_episode_sizes, PLAN)
