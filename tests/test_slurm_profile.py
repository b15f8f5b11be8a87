"""The Slurm profiles as a cluster sees them: the sbatch lines the executor plugin submits.

The workflow runs with `--workflow-profile profiles/slurm` and a site profile made from
profiles/site-example, against fake Slurm commands that record each sbatch line and report every
job as failed (so the plugin's retries show, and nothing runs). The job outputs of the CI config
are first marked up to date with `--touch`, so each run submits exactly the jobs whose outputs
are then deleted.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ci.yaml"
ACCOUNT = "site_account"

FAKE_SLURM = {
    # sbatch --parsable answers with the job id; every call is recorded, one line each.
    "sbatch": """#!{python}
import os, shlex, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_LOG"])
with log.open("a") as f:
    f.write(shlex.join(sys.argv[1:]) + "\\n")
print(1000 + len(log.read_text().splitlines()))
""",
    # sacct: every job submitted so far, and every task of an array, has failed.
    "sacct": """#!{python}
import os, re
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_LOG"])
for n, line in enumerate(log.read_text().splitlines() if log.exists() else [], 1001):
    m = re.search(r"--array[= ](\\d+)-(\\d+)", line)
    ids = [f"{{n}}_{{i}}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [str(n)]
    print("\\n".join(f"{{i}}|FAILED" for i in ids))
""",
    "sacctmgr": f"#!/bin/sh\necho {ACCOUNT}\n",
    "scontrol": "#!/bin/sh\necho 'MaxArraySize = 1001'\necho 'MinJobAge = 300'\n",
    "sinfo": "#!/bin/sh\nexit 0\n",
    "squeue": "#!/bin/sh\nexit 0\n",
}

EVAL = "results/eval/small_vit/5w1s/seed0/{domain}/lora.csv"  # lora: rule evaluate_merged
MEMBER0 = "results/models/small_vit/5w1s/seed0/amt_separate/member0/model.pt"
# The runs, in order, each on outputs deleted just before it (its inputs all in place): the
# report; two evaluations (one array); a conversion and a pool member's training, with retries.
WAVES = [["results/tables"], [EVAL.format(domain="glyphs"), EVAL.format(domain="digits")],
         ["results/data/digits.h5", MEMBER0]]


def snakemake(*args: str, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(CONFIG), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def make_outputs(workdir: Path, env: dict[str, str]) -> None:
    """The CI config's two domain stores converted for real (the workflow reads their class
    sizes before planning), every other output as an empty file (the report's two folders as
    folders), then all marked up to date, in the DAG's order, by `snakemake --touch`."""
    stores = snakemake("--cores", "2", "results/data/glyphs.h5", "results/data/digits.h5",
                       workdir=workdir, env=env)
    assert stores.returncode == 0, stores.stderr[-3000:]
    summary = snakemake("--summary", "--config", "device=cuda", workdir=workdir, env=env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    for row in summary.stdout.splitlines()[1:]:
        path = workdir / row.split("\t")[0]
        if path.name in ("tables", "figures"):
            path.mkdir(parents=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    touched = snakemake("--touch", "--cores", "1", "--config", "device=cuda",
                        workdir=workdir, env=env)
    assert touched.returncode == 0, touched.stderr[-3000:]


@pytest.fixture(scope="module")
def submissions(tmp_path_factory) -> dict[str, list[list[str]]]:
    """rule -> the sbatch argument lists of its submissions over the runs of WAVES."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    root = tmp_path_factory.mktemp("slurm")
    bin_dir, workdir, site = root / "bin", root / "work", root / "site"
    for folder in (bin_dir, workdir, site):
        folder.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    example = REPO / "profiles" / "site-example"
    (site / "config.yaml").write_text(
        (example / "config.yaml").read_text().replace("<your account>", ACCOUNT))
    shutil.copy(example / "partitions.yaml", site)
    log = root / "sbatch.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_LOG": str(log)}
    env.pop("SNAKEMAKE_PROFILE", None)

    make_outputs(workdir, env)
    on_cluster = ("--workflow-profile", str(REPO / "profiles" / "slurm"), "--profile", str(site),
                  "--slurm-init-seconds-before-status-checks", "1",
                  "--seconds-between-status-checks", "1", "--latency-wait", "1")
    # The profile's retries for the last wave only: the plugin's status-check intervals grow
    # with every retry.
    for i, targets in enumerate(WAVES):
        retries = () if i == len(WAVES) - 1 else ("--retries", "0")
        for target in targets:
            path = workdir / target
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        run = snakemake(*on_cluster, *retries, *targets, workdir=workdir, env=env)
        assert run.returncode != 0, "every fake job fails, so the run must too"
        assert "At least one job did not complete successfully" in run.stderr, run.stderr[-3000:]

    lines = [shlex.split(line) for line in log.read_text().splitlines()]
    by_rule: dict[str, list[list[str]]] = {}
    for args in lines:
        comment = args[args.index("--comment") + 1]  # rule_<name>[_wildcards_<values>]
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(args)
    print("\n".join(shlex.join(["sbatch", *(x for x in a if not x.startswith("--wrap")),
                                 "--wrap=..."]) for a in lines))
    return by_rule


def option(args: list[str], name: str) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in an sbatch argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


@pytest.mark.parametrize("rule", ["convert_digits", "report"])
def test_cpu_rules_go_to_the_cpu_partition_sized_by_threads(submissions, rule):
    first = submissions[rule][0]
    assert option(first, "-p") == "cpu"
    assert option(first, "-A") == ACCOUNT
    assert option(first, "--gpus") is None and not any("gpu" in a for a in first[:-1])
    threads = "2" if rule == "convert_digits" else "1"  # convert: config's `workers`
    assert option(first, "--cpus-per-task") == threads


@pytest.mark.parametrize("rule", ["train_amt_member", "evaluate_merged"])
def test_gpu_rules_go_to_the_gpu_partition_with_cpus_per_gpu(submissions, rule):
    first = submissions[rule][0]
    assert option(first, "-p") == "gpu"
    assert option(first, "--gpus") == "1" or option(first, "--gres") == "gpu:1"
    threads = {"train_amt_member": "8", "evaluate_merged": "4"}[rule]  # profiles/slurm
    assert option(first, "--cpus-per-gpu") == threads
    assert option(first, "--cpus-per-task") is None
    assert "device=cuda" in option(first, "--wrap")


def test_evaluations_are_submitted_as_one_array(submissions):
    (array, *retries) = submissions["evaluate_merged"]
    first, last = map(int, option(array, "--array").split("-"))
    assert last - first + 1 == 2  # the two evaluations of FIRST_WAVE, as one array


def test_retries_ask_for_more_memory_and_time(submissions):
    attempts = submissions["train_amt_member"]
    assert len(attempts) == 3  # profiles/slurm: retries: 2
    assert [option(a, "--mem") for a in attempts] == ["8000", "16000", "24000"]
    assert [option(a, "-t") for a in attempts] == ["720", "1440", "2160"]


def test_no_account_is_committed():
    for profile in (REPO / "profiles").rglob("*.yaml"):
        text = profile.read_text()
        assert "slurm_account" not in text or "<your account>" in text, profile


def test_a_gpu_job_on_a_node_without_one_stops_at_once(tmp_path):
    """The Slurm profile runs every GPU rule with device cuda: on a node without a GPU the job
    stops before it reads any input (the store here does not even exist), naming job and node."""
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "cpu-node-7",
           "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-m", "amt", "evaluate", "--method", "pm", "--model", "none.pt",
         "--store", str(tmp_path / "missing.h5"), "--episodes", "none.json", "--benchmark", "b",
         "--domain", "d", "--no-in-domain", "--setting-name", "5w1s", "--device", "cuda",
         "--out", str(tmp_path / "out.csv")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "CUDA is not available" in run.stderr
    assert "Slurm job 4242 on node cpu-node-7" in run.stderr
    assert "missing.h5" not in run.stderr and "Traceback" not in run.stderr
