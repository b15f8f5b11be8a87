"""bench/gpu_check.sh's Python side: the workflow step's config, and the one JSON it writes.

    python bench/gpu_check.py workflow-config --backbone dino_vits16 --device cuda --folder DIR
    python bench/gpu_check.py report --work DIR --mode gpu --backbone dino_vits16 --out FILE

``workflow-config`` writes DIR/config.yaml (configs/ci.yaml on the given device and backbone,
the backbone's random weights in DIR/backbone.pth so that nothing is pretrained, and fewer
glyphs) and prints the Snakemake target: amt's evaluation on digits, which needs two short
training runs (the pool's members), a pool, a selection and the evaluation.

``report`` gathers what the steps left in DIR (steps.tsv, tests.xml, the outputs
bench_train.out, bench_eval.out and workflow_config.out, the workflow's benchmark files) and
estimates configs/paper.yaml's GPU-hours per stage from the measured rates (``estimate``; its
formulas are written into the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import yaml

from amt.conditions import build_conditions
from amt.config import check, load_schema
from amt.plan import Plan, path
from amt.registry import METHODS, backbone_entry
from amt.specs import AttackSpec, Hyper, grid_points

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
# Fewer glyph classes than CI's (which renders 879 train classes in ~70 s on 2 cores): enough
# for 5-way training episodes, and nothing is pretrained on them here.
GLYPHS = {"scripts": ["Latin", "N'Ko", "Armenian"], "max_classes_per_script": 10,
          "instances": 8}
TAIL_CHARS = 3000  # of a failed step's log, kept in the JSON
# A StyleAdv episode in pm steps: 3 style attacks (a forward-backward each), the clean and the
# adversarial pass and their backward (an estimate, not measured by bench_train)
STYLEADV_PASSES = 5
FORMULAS = {
    "train": "sum over baseline and pool-member jobs of epochs x episodes_per_epoch x "
             "t_train(case, shots) + (epochs + 1) x validation domains x validation episodes "
             "x t_forward; case = pm | lora for baselines (styleadv: 5 x t_pm), amt for "
             "members with APQ "
             "(t_amt(k) = t_apsv + k / k_bench x (t_amt_bench - t_apsv): APQ's PGD scaled to "
             "the config's attack_steps k), apsv or lora without it; t_train: bench_train's "
             "median s/episode; shots: the evaluated setting's (its training episodes, "
             "train.episodes, have as many and at most as many queries)",
    "select": "sum over selection jobs of valid episodes x (t_clean + (G - 1) x t_forward "
              "+ G x t_str [if the method trims] + G_ft x ft_steps x t_ft [if it fine-tunes; "
              "Adv. TTF: x (1 + ft_attack_steps)]); "
              "G: grid points, G_ft: points with lr > 0; t_clean: bench_eval's amt episode "
              "(pool methods) or pm episode (pm, pmf, lora); t_forward: one forward of "
              "|S| + |Q| images; t_str: STr on every LoRA layer; t_ft: a pm training step "
              "(bench_train, |S| + |Q| images: an upper bound of a fine-tuning step)",
    "evaluate": "sum over evaluation jobs of test episodes x (t_clean + t_str + ft_steps x "
                "t_ft [as in select] + A x t_step + C x t_forward) + sanity episodes x "
                "A_sanity x t_step; A: attack steps x restarts summed over the attacked "
                "conditions; C: noise and corruption conditions; A_sanity: the sanity "
                "checks' extra steps (each PGD condition at 2k steps, the large budget); "
                "t_step = (t_pgd - t_amt) / k: one forward-backward of the queries, from "
                "bench_eval's attacked episode in which no query falls (an upper bound: "
                "fallen queries leave the batch; APGD counted as PGD per step)",
    "total": "train + select + evaluate, one job at a time on one GPU, data loading and job "
             "start-up excluded (the paper config's backbones are all ViT-S/16: the measured "
             "backbone's rates apply to each)",
}


# -- the workflow step ----------------------------------------------------------------------------
def workflow_config(backbone: str, device: str, folder: Path) -> str:
    """Write folder/config.yaml and folder/backbone.pth; return the Snakemake target."""
    import torch

    from amt.backbones import build_backbone

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = folder / "backbone.pth"
    torch.save(build_backbone(backbone, None, backbone_entry(backbone).image_size)
               .vit.state_dict(), weights)
    config = yaml.safe_load(CI_CONFIG.read_text())
    config["device"] = device
    config["domains"]["glyphs"]["options"] = GLYPHS
    config["backbones"] = {backbone: {"checkpoint": str(weights)}}
    config["train"]["backbones"] = [backbone]
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    evaluate = config["evaluate"]
    return path("rows", backbone=backbone, setting=evaluate["settings"][0],
                seed=Plan(config).seeds[0], domain=evaluate["targets"][-1], method="amt")


# -- the estimate ---------------------------------------------------------------------------------
class Rates:
    """Measured seconds per episode of one backbone, by shot count."""

    def __init__(self, train: dict, evaluation: dict, backbone: str) -> None:
        self.attack_steps = train["attack_steps"]
        self.train = {(r["case"], r["shots"]): r["seconds_median"] for r in train["results"]
                      if r["backbone"] == backbone}
        self.eval = {r["shots"]: r for r in evaluation["episodes"] if r["backbone"] == backbone}
        if not self.train or not self.eval:
            raise ValueError(f"no bench_train or bench_eval rows of backbone {backbone}")

    def _train(self, case: str, shots: int) -> float:
        if (case, shots) not in self.train:
            raise ValueError(f"bench_train measured no {case} episode of {shots} shots")
        return self.train[case, shots]

    def _eval(self, shots: int) -> dict:
        if shots not in self.eval:
            raise ValueError(f"bench_eval measured no episode of {shots} shots")
        return self.eval[shots]

    def train_step(self, spec, shots: int) -> float:
        """Seconds per episode of one training job's spec (a TrainConfig)."""
        if spec.method == "styleadv":
            return STYLEADV_PASSES * self._train("pm", shots)
        if spec.method != "amt" or not (spec.apq or spec.apsv):
            return self._train("pm" if spec.method == "pm" else "lora", shots)
        if not spec.apq:
            return self._train("apsv", shots)
        apsv, amt = self._train("apsv", shots), self._train("amt", shots)
        return apsv + spec.attack_steps / self.attack_steps * (amt - apsv)

    def clean(self, method: str, shots: int) -> float:
        row = self._eval(shots)
        return row["amt"] if METHODS[method].pooled else row["pm"]

    def forward(self, shots: int) -> float:
        return self._eval(shots)["pm_work"]

    def trim(self, method: str, shots: int) -> float:
        return self._eval(shots)["trim"]["all"] if METHODS[method].trim else 0.0

    def attack_step(self, shots: int) -> float:
        row = self._eval(shots)
        return max(row["pgd"] - row["amt"], 0.0) / row["steps"]

    def finetune(self, method: str, shots: int, ft_steps: int, attack_steps: int) -> float:
        """A fine-tuning's steps, each a pm training step (Adv. TTF: and one per attack step
        on the support copies, an overestimate: those run on the copies alone)."""
        entry = METHODS[method]
        passes = 1 + (attack_steps if entry.ft_adversarial else 0)
        return ft_steps * passes * self._train("pm", shots) if entry.finetune else 0.0


def _ft_attack_steps(plan: Plan) -> int:
    return plan.evaluate.get("ft_attack_steps", Hyper().ft_attack_steps)


def _setting_shots(plan: Plan, setting: str) -> int:
    return plan.config["settings"][setting]["shots"]


def _training_seconds(plan: Plan, rates: Rates, job: dict, spec) -> float:
    """One run's episodes, and its validation before training and after every epoch."""
    shots = _setting_shots(plan, job["setting"])
    seconds = spec.epochs * spec.episodes_per_epoch * rates.train_step(spec, shots)
    episodes = plan.train.get("validation", {}).get("count", 0) * len(plan.validation_domains)
    return seconds + (episodes * (spec.epochs + 1) * rates.forward(shots) if episodes else 0.0)


def _selection_seconds(plan: Plan, rates: Rates, job: dict) -> float:
    spec, shots = plan.select_spec(**job), _setting_shots(plan, job["setting"])
    method = job["method"]
    points = grid_points(spec.grid, method)
    tuned = sum(1 for p in points if p.get("lr", 0) > 0)
    ft_steps = spec.ft_steps if spec.ft_steps is not None else Hyper().ft_steps
    per_episode = (rates.clean(method, shots) + (len(points) - 1) * rates.forward(shots)
                   + len(points) * rates.trim(method, shots)
                   + tuned * rates.finetune(method, shots, ft_steps, _ft_attack_steps(plan)))
    return plan.config["episodes"]["valid"]["count"] * per_episode


def _attack_steps(spec, conditions: list) -> tuple[int, int]:
    """(attack steps per episode, extra steps of a sanity-checked episode) of an EvalConfig:
    amt.sanity's runs, each PGD condition at twice its steps and the large budget with the
    first l_inf PGD's steps."""
    attacked = [c.spec for c in conditions if c.spec is not None]
    steps = sum(s.steps * s.restarts for s in attacked)
    sanity = sum(2 * s.steps * s.restarts for s in attacked if s.attack == "pgd")
    if spec.sanity.large_eps is not None:
        large = next((s for s in spec.attacks if s.attack == "pgd" and s.norm == "linf"),
                     AttackSpec("pgd", "linf", (spec.sanity.large_eps,)))
        sanity += large.steps * large.restarts
    return steps, sanity


def _evaluation_seconds(plan: Plan, rates: Rates, job: dict) -> float:
    spec, shots = plan.eval_spec(**job), _setting_shots(plan, job["setting"])
    method = job["method"]
    episodes = plan.config["episodes"]["test"]["count"]
    conditions = build_conditions(spec.attacks, spec.corruptions)
    steps, sanity = _attack_steps(spec, conditions)
    forwards = sum(1 for c in conditions if c.spec is None and c.attack != "none")
    per_episode = (rates.clean(method, shots) + rates.trim(method, shots)
                   + rates.finetune(method, shots,
                                    plan.evaluate.get("ft_steps", Hyper().ft_steps),
                                    _ft_attack_steps(plan))
                   + steps * rates.attack_step(shots) + forwards * rates.forward(shots))
    return episodes * per_episode + min(spec.sanity.episodes, episodes) * sanity * \
        rates.attack_step(shots)


def estimate(config: dict, rates: Rates) -> dict:
    """GPU-hours per stage of ``config`` (one job at a time on one GPU) from measured rates."""
    plan = check(config, load_schema())
    stages: dict[str, float] = defaultdict(float)
    for job in plan.baselines():
        stages["train"] += _training_seconds(plan, rates, job, plan.baseline_spec(**job))
    for job in plan.members():
        stages["train"] += _training_seconds(plan, rates, job, plan.member_spec(**job))
    for job in plan.selections():
        stages["select"] += _selection_seconds(plan, rates, job)
    for job in plan.evaluations():
        stages["evaluate"] += _evaluation_seconds(plan, rates, job)
    counts = plan.job_counts()
    hours = {stage: stages[stage] / 3600 for stage in ("train", "select", "evaluate")}
    return {"gpu_hours": {**hours, "total": sum(hours.values())},
            "jobs": {"train": counts["train_baseline"] + counts["train_amt_member"],
                     "select": counts["select_hyperparameters"],
                     "evaluate": counts["evaluate"] + counts["evaluate_merged"]},
            "episodes": {"train_per_job": config["train"]["epochs"]
                         * config["train"]["episodes_per_epoch"],
                         "valid": config["episodes"]["valid"]["count"],
                         "test": config["episodes"]["test"]["count"]},
            "formulas": FORMULAS}


# -- the report -----------------------------------------------------------------------------------
def _steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, log = line.split("\t")
        step = {"step": name, "rc": int(rc), "seconds": float(seconds),
                "timed_out": int(rc) in (124, 137), "ok": rc == "0"}
        if rc != "0" and Path(log).is_file():
            step["log_tail"] = Path(log).read_text(errors="replace")[-TAIL_CHARS:]
        steps.append(step)
    return steps


def _tests(xml: Path) -> dict | None:
    """pytest's JUnit XML -> counts and each test's outcome and seconds."""
    if not xml.is_file():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case
                        if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    counts = {o: sum(c["outcome"] == o for c in cases)
              for o in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "seconds": float(suite.get("time", 0)), "tests": cases}


def _job_seconds(results: Path) -> dict:
    """Seconds per job of the workflow run (Snakemake's benchmark files), by rule."""
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for tsv in sorted((results / "benchmarks").glob("*/*.tsv")):
        lines = tsv.read_text().splitlines()
        if len(lines) > 1:
            found[tsv.parent.name][tsv.stem] = float(lines[1].split("\t")[0])
    return dict(found)


def _load(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    return info


def report(work: Path, mode: str, why: str, backbone: str) -> dict:
    train, evaluation = _load(work / "bench_train.out"), _load(work / "bench_eval.out")
    out = {"mode": mode, "why": why, "machine": _machine(), "steps": _steps(work),
           "cuda_tests": _tests(work / "tests.xml"), "bench_train": train,
           "bench_eval": evaluation,
           "workflow": {"target": (work / "workflow_config.out").read_text().strip()
                        if (work / "workflow_config.out").is_file() else None,
                        "job_seconds": _job_seconds(work / "workflow" / "run" / "results")}}
    paper = yaml.safe_load(PAPER_CONFIG.read_text())
    same = {backbone_entry(b).arch for b in paper["train"]["backbones"]} == \
        {backbone_entry(backbone).arch}
    try:
        out["paper_estimate"] = {
            "rates_from": backbone, "representative": same,
            "note": None if same else f"rates of {backbone}, not of the paper's ViT-S/16: "
                    "these figures only exercise the formulas",
            **estimate(paper, Rates(train, evaluation, backbone))}
    except (TypeError, KeyError, ValueError) as err:  # a bench step failed or left no rows
        out["paper_estimate"] = {"error": f"{type(err).__name__}: {err}"}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    flow = commands.add_parser("workflow-config")
    flow.add_argument("--backbone", required=True)
    flow.add_argument("--device", required=True)
    flow.add_argument("--folder", type=Path, required=True)
    gather = commands.add_parser("report")
    gather.add_argument("--work", type=Path, required=True)
    gather.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    gather.add_argument("--why", default="")
    gather.add_argument("--backbone", required=True)
    gather.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "workflow-config":
        print(workflow_config(args.backbone, args.device, args.folder))
        return 0
    result = report(args.work, args.mode, args.why, args.backbone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [s["step"] for s in result["steps"] if not s["ok"]]
    tests = result["cuda_tests"]
    if tests and (tests["counts"]["failure"] or tests["counts"]["error"]):
        failed.append("cuda_tests")
    if "error" in result["paper_estimate"]:
        failed.append("paper_estimate")
    print(f"{args.out}: {'failed: ' + ', '.join(failed) if failed else 'every step passed'}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
