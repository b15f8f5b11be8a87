"""The workflow's plan, tested directly: which jobs a config makes and what each one gets."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amt.errors import UserError
from amt.plan import MEMBER_KEYS, MEMBER_SEED_STRIDE, PATHS, RUN_KEYS, Plan, mean_budget, path
from amt.registry import METHODS
from amt.specs import EvalConfig, SelectConfig, StatsOptions, TrainConfig, from_json, to_json

ROOT = Path(__file__).parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())
PAPER = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())


def _plan(**train_amt) -> Plan:
    config = copy.deepcopy(DEFAULT)
    config["train"]["amt"].update(train_amt)
    return Plan(config)


def test_separate_members_train_at_one_budget_each_with_the_run_seed():
    plan = _plan(budgets=["1/255", "2/255", "4/255"])
    specs = [plan.member_spec("small_vit", "5w1s", "amt", "separate", i) for i in range(3)]
    assert [s.budgets for s in specs] == [(1 / 255,), (2 / 255,), (4 / 255,)]
    assert {s.seed for s in specs} == {DEFAULT["seed"]}


def test_uniform_members_train_at_the_mean_budget_with_their_own_seeds():
    plan = _plan(budgets=["1/255", "2/255", "4/255"], pool_strategies=["uniform"])
    specs = [plan.member_spec("small_vit", "5w1s", "amt", "uniform", i) for i in range(3)]
    assert all(s.budgets == (7 / 765,) for s in specs)  # (1 + 2 + 4) / 3 / 255, exactly
    assert [s.seed for s in specs] == [DEFAULT["seed"] + MEMBER_SEED_STRIDE * i for i in range(3)]
    assert mean_budget(["1/255", 0.5]) == (1 / 255 + 0.5) / 2


def test_random_members_draw_from_every_budget():
    plan = _plan(budgets=["1/255", "8/255"], pool_strategies=["random"])
    spec = plan.member_spec("small_vit", "5w1s", "amt", "random", 1)
    assert spec.budgets == (1 / 255, 8 / 255) and spec.seed == DEFAULT["seed"] + MEMBER_SEED_STRIDE
    assert {spec.episode_budget(i) for i in range(30)} == {1 / 255, 8 / 255}


def test_members_get_the_pool_keys_and_baselines_do_not():
    plan = _plan(attack_steps=4, apsv=False, lambda_adv=2.0)
    member = plan.member_spec("small_vit", "5w1s", "amt", "separate", 0)
    baseline = plan.baseline_spec("small_vit", "5w1s", "lora")
    assert (member.attack_steps, member.apsv, member.lambda_adv) == (4, False, 2.0)
    assert (baseline.method, baseline.attack_steps) == ("lora", TrainConfig.attack_steps)
    for spec in (member, baseline):
        assert spec.backbone_checkpoint == path("backbone", backbone="small_vit")
        assert (spec.epochs, spec.lr) == (DEFAULT["train"]["epochs"], DEFAULT["train"]["lr"])
        assert spec.setting == DEFAULT["settings"]["5w1s"]


@pytest.mark.parametrize(("method", "artefact"), [
    ("pm", "pm/model.pt"), ("pmf", "pm/model.pt"), ("lora", "lora/model.pt"),
    ("amt", "amt_separate/pool.pt"), ("amt_ft", "amt_separate/pool.pt"),
    ("amt_pool_uniform", "amt_uniform/pool.pt"), ("amt_pool_random", "amt_random/pool.pt"),
])
def test_each_method_reads_its_trained_artefact(method, artefact):
    plan = Plan(PAPER)
    assert plan.trained_artefact("dino_vits16", "5w1s", method) == \
        f"results/models/dino_vits16/5w1s/seed0/{artefact}"


def test_every_training_seed_trains_selects_and_evaluates_on_the_same_episodes():
    config = copy.deepcopy(PAPER)
    config["train"]["seeds"] = [0, 1, 2]
    plan, one = Plan(config), Plan(PAPER)
    counts, single = plan.job_counts(), one.job_counts()
    for rule in ("train_baseline", "train_amt_member", "assemble_pool"):
        assert counts[rule] == 3 * single[rule], rule
    for jobs in (Plan.evaluations, Plan.selections):  # the released pool: the first seed only
        released = sum(METHODS[j["method"]].released for j in jobs(one))
        assert released and len(jobs(plan)) == 3 * (len(jobs(one)) - released) + released
    for rule in ("draw_episodes", "pretrain_backbone", "import_release", "convert"):
        assert counts[rule] == single[rule], rule
    members = [plan.member_spec(**job) for job in plan.members()
               if job["strategy"] == "random" and job["backbone"] == "dino_vits16"
               and job["setting"] == "5w1s"]
    assert len({m.seed for m in members}) == len(members)  # no seed reused across runs
    where = {"backbone": "dino_vits16", "setting": "5w1s", "domain": "cub", "method": "amt_ft"}
    specs = [plan.eval_spec(**where, seed=seed) for seed in (0, 1, 2)]
    assert len({s.episodes for s in specs}) == 1 and [s.seed for s in specs] == [0, 1, 2]
    assert [str(s.model) for s in specs] == [
        f"results/models/dino_vits16/5w1s/seed{k}/amt_separate/pool.pt" for k in (0, 1, 2)]
    assert [str(s.selection) for s in specs] == [
        f"results/selection/dino_vits16/5w1s/seed{k}/cub/amt_ft.json" for k in (0, 1, 2)]
    assert len({str(s.out) for s in specs}) == 3
    assert plan.select_spec(**where, seed=2).base_selection == \
        Path("results/selection/dino_vits16/5w1s/seed2/cub/amt.json")


def test_amt_release_reads_the_imported_release_wherever_a_backbone_has_one():
    plan = Plan(PAPER)
    assert plan.trained_artefact("dino_vits16", "5w5s", "amt_release") == \
        "results/models/dino_vits16/5w5s/release/pool.pt"
    released = [job for job in plan.evaluations() if job["method"] == "amt_release"]
    assert {job["backbone"] for job in released} == {"dino_vits16"}  # ibot, deit: no release
    assert len(released) == 2 * len(PAPER["evaluate"]["targets"])
    assert plan.releases() == [{"backbone": "dino_vits16", "setting": s} for s in ("5w1s", "5w5s")]
    spec = plan.import_spec("dino_vits16", "5w1s")
    assert spec.checkpoint == Path("/models/metadataset_imagenet_advmetatuned_5w1s.pth")
    assert (spec.out, spec.backbone_out) == (
        Path("results/models/dino_vits16/5w1s/release/pool.pt"),
        Path("results/models/dino_vits16/5w1s/release/backbone.pt"))
    assert spec.image_size == 128 and spec.pos_embed == "interpolate"  # as the release
    select = plan.select_spec("dino_vits16", "5w1s", "isic", "amt_release")
    assert select.model == Path(spec.out) and "top_k" not in select.grid


def test_amt_ft_chains_to_amts_selection():
    plan = Plan(PAPER)
    where = ("dino_vits16", "5w5s", "cub")
    spec = plan.select_spec(*where, "amt_ft")
    assert str(spec.base_selection) == "results/selection/dino_vits16/5w5s/seed0/cub/amt.json"
    assert plan.base_selection(*where, "pmf") is None
    assert plan.eval_spec(*where, "amt_ft").selection == \
        Path("results/selection/dino_vits16/5w5s/seed0/cub/amt_ft.json")
    assert plan.eval_spec(*where, "pm").selection is None


def test_evaluation_specs_carry_the_configs_threat_model_and_episodes():
    plan = Plan(DEFAULT)
    spec = plan.eval_spec("small_vit", "5w1s", "glyphs", "amt")
    assert spec.in_domain and spec.benchmark == "builtin" and spec.setting_name == "5w1s"
    assert spec.episodes == Path(path("episodes", domain="glyphs", kind="test", setting="5w1s"))
    assert spec.attacks[0].eps == (1 / 255, 4 / 255) and spec.sanity.large_eps == 64 / 255
    assert spec.out == Path(path("rows", backbone="small_vit", setting="5w1s", domain="glyphs",
                                 method="amt", seed=DEFAULT["seed"]))
    assert not plan.eval_spec("small_vit", "5w1s", "mnist", "amt").in_domain


def test_the_paper_config_takes_the_releases_and_pmfs_evaluation_choices():
    plan = Plan(PAPER)
    isic, md = plan.eval_spec("dino_vits16", "5w1s", "isic", "amt"), \
        plan.eval_spec("dino_vits16", "5w1s", "omniglot", "amt")
    assert (isic.test_transform, isic.resize, isic.image_size) == ("squash", 147, 128)
    assert (md.test_transform, md.resize) == ("crop", 146)
    select = plan.select_spec("dino_vits16", "5w1s", "isic", "amt")
    assert (select.test_transform, select.resize) == ("squash", 147)  # as its evaluation
    assert (select.str_solver, select.score_precision) == ("lowrank", "fp32")
    for member in plan.members():
        assert plan.member_spec(**member).pos_embed == "interpolate"
    assert plan.stats_options() == StatsOptions(std_ddof=1, average_ci="mean")
    assert "--squash-side 224 --codec png" in plan.convert_arguments("ilsvrc_2012")
    assert "--short-side 0" in plan.convert_arguments("isic")


def test_the_default_config_keeps_its_own_choices():
    plan = Plan(DEFAULT)
    spec = plan.select_spec("small_vit", "5w1s", "glyphs", "amt")
    assert (spec.test_transform, spec.str_solver, spec.score_precision) == \
        ("crop", "exact", "fp32")
    assert plan.baseline_spec("small_vit", "5w1s", "pm").pos_embed == "resample"
    assert plan.report_arguments() == \
        "--std-ddof 1 --average-ci pooled --reference-methods pm lora"
    assert plan.convert_arguments("glyphs") == "glyphs"


RELEASE_STEPS = (("beta", "gamma", "top_k"), ("str",), ("lr",))


def _stages(grid: dict | list) -> list[dict]:
    return grid if isinstance(grid, list) else [grid]


def _release_points(grid: dict | list) -> int:
    """What the release's selection evaluates for the same value lists: beta x gamma (k fixed),
    then the STr candidates at the best of them, then the lr (AMT: test_meta_dataset.py:95-161):
    the steps' products added, not multiplied."""
    lengths = {k: len(v) for stage in _stages(grid) for k, v in stage.items()}
    return sum(math.prod(lengths[k] for k in step if k in lengths)
               for step in RELEASE_STEPS if lengths.keys() & set(step))


def test_no_paper_selection_job_searches_more_points_than_the_release():
    grids, sizes = PAPER["evaluate"]["grids"], Plan(PAPER).grid_sizes()
    for method, grid in grids.items():
        assert sizes[method] <= _release_points(grid), method
        base = METHODS[method].base  # amt_ft: lr only, on top of amt's selection
        if base:
            assert not {k for s in _stages(grids[base]) for k in s} & \
                {k for s in _stages(grid) for k in s}, method
    assert (sizes["amt"], sizes["amt_ft"]) == (9 * 6 + 4, 4)
    merge = _stages(grids["amt"])[0]
    assert merge["top_k"] == [2] and (merge["beta"][0], merge["gamma"][0]) == (1.0, 0.6)
    assert _release_points({"beta": [1, 2], "gamma": [0.6], "str": ["none"] * 3}) == 5
    assert Plan(DEFAULT).grid_sizes() == {"amt": 8}  # one stage: the product


def test_the_summary_lists_jobs_per_rule_and_grid_points():
    summary = Plan(PAPER).summary()
    assert summary.startswith("5600 jobs:")
    assert re.search(r"^  select_hyperparameters +2196$", summary, re.M)
    assert re.search(r"^  draw_episodes +88$", summary, re.M)  # 16 validate training
    assert re.search(r"^  amt_ft +4$", summary, re.M) and "fetch_builtin" not in summary


@pytest.mark.parametrize("cls_and_job", ["train", "select", "eval"])
def test_specs_round_trip_through_the_json_the_rules_pass(cls_and_job):
    plan = Plan(PAPER)
    spec = {"train": lambda: plan.member_spec("ibot_vits16", "5w5s", "amt", "random", 2),
            "select": lambda: plan.select_spec("dino_vits16", "5w1s", "isic", "amt_ft"),
            "eval": lambda: plan.eval_spec("deit_vits16", "5w1s", "chestx", "amt")}[cls_and_job]()
    cls = {"train": TrainConfig, "select": SelectConfig, "eval": EvalConfig}[cls_and_job]
    assert from_json(cls, to_json(spec)) == spec


def test_spectra_are_declared_for_the_merging_methods_of_the_first_backbone_and_setting():
    plan = Plan(DEFAULT)
    spectra = plan.spectra_files()
    assert spectra and all("/small_vit/5w1s/" in p for p in spectra)
    assert {Path(p).name.removesuffix(".spectra.csv") for p in spectra} == \
        {m for m in DEFAULT["evaluate"]["methods"] if METHODS[m].merges}


def test_every_path_template_is_used_by_a_rule_or_the_plan():
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    plan_code = (ROOT / "amt" / "plan.py").read_text()
    outside_table = plan_code[plan_code.index("JOB_NAMES"):]
    unused = [name for name in PATHS if f'"{name}"' not in rules + outside_table]
    assert unused == []


def test_the_plan_counts_the_jobs_of_snakemakes_dag(tmp_path):
    """The plan's job counts are the DAG's (so the paper config's header and a dry run's
    summary can come from the plan): rule by rule, for the default config."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-d",
                          str(tmp_path), "-s", str(ROOT / "Snakefile")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    dag = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", run.stdout, re.M)
           if m[1] != "total"}
    counts = Plan(DEFAULT).job_counts()
    converts = {rule: n for rule, n in dag.items() if rule.startswith("convert_")}
    assert sum(converts.values()) == counts.pop("convert")
    assert {rule: n for rule, n in dag.items() if rule not in converts} == \
        {rule: n for rule, n in counts.items() if n}


def test_the_paper_configs_header_states_its_job_count():
    header = (ROOT / "configs" / "paper.yaml").read_text().split("\n\n")[0]
    stated = int(re.search(r"The DAG has ([\d,]+) jobs", header)[1].replace(",", ""))
    assert sum(Plan(PAPER).job_counts().values()) == stated


def test_overrides_replace_the_run_keys_of_their_trained_method_only():
    config = copy.deepcopy(DEFAULT)
    config["train"]["overrides"] = {"pm": {"lr": 2.5e-5, "epochs": 5,
                                           "schedule": "cosine_epoch_timm_after"}}
    plan = Plan(config)
    pm, lora = (plan.baseline_spec("small_vit", "5w1s", t) for t in ("pm", "lora"))
    member = plan.member_spec("small_vit", "5w1s", "amt", "separate", 0)
    assert (pm.lr, pm.epochs, pm.schedule) == (2.5e-5, 5, "cosine_epoch_timm_after")
    for spec in (lora, member):
        assert (spec.lr, spec.epochs, spec.schedule) == \
            (DEFAULT["train"]["lr"], DEFAULT["train"]["epochs"], DEFAULT["train"]["schedule"])
    assert pm.keep == lora.keep == DEFAULT["train"]["keep"]  # what no override replaces


def test_the_schemas_run_keys_are_the_plans_and_overrides_take_the_same():
    from amt.config import load_schema

    train = load_schema()["properties"]["train"]["properties"]
    overrides = train["overrides"]["additionalProperties"]["properties"]
    assert set(RUN_KEYS) == set(overrides) and set(RUN_KEYS) <= set(train)
    assert set(MEMBER_KEYS) <= set(train["amt"]["properties"])


def test_training_episodes_and_validation_come_from_the_mapped_setting():
    config = copy.deepcopy(DEFAULT)
    config["settings"]["md_5w1s"] = {"variable": True, "max_ways": 5, "max_support_per_class": 1}
    config["train"]["episodes"] = {"5w1s": "md_5w1s"}
    config["train"]["validation"] = {"domains": ["glyphs", "mnist"], "count": 7, "seed": 3}
    plan = Plan(config)
    for spec in (plan.baseline_spec("small_vit", "5w1s", "lora"),
                 plan.member_spec("small_vit", "5w1s", "amt", "separate", 0)):
        assert spec.setting == config["settings"]["md_5w1s"]
    assert plan.baseline_spec("small_vit", "5w5s", "pm").setting == DEFAULT["settings"]["5w5s"]
    assert plan.validation_stores() == [path("store", domain=d) for d in ("glyphs", "mnist")]
    assert plan.validation_episodes("5w1s") == [
        f"results/episodes/{d}/train_valid_md_5w1s.json" for d in ("glyphs", "mnist")]
    assert plan.validation_episodes("5w5s")[0] == "results/episodes/glyphs/train_valid_5w5s.json"
    draws = [spec for rule, spec in plan.specs() if rule == "draw_episodes"
             and spec.kind == "train_valid"]
    assert sorted((s.domain, s.setting_name, s.count, s.seed) for s in draws) == [
        (d, s, 7, 3) for d in ("glyphs", "mnist") for s in ("5w5s", "md_5w1s")]
    assert draws[0].setting == config["settings"][draws[0].setting_name]
    assert plan.validation_logs()[0] == \
        "results/models/small_vit/5w1s/seed0/pm/valid_log.csv"


def test_validation_defaults_to_the_training_sources_and_is_off_without_its_key():
    config = copy.deepcopy(DEFAULT)
    assert Plan(config).validation_domains == DEFAULT["train"]["sources"]
    del config["train"]["validation"]
    assert Plan(config).validation_episodes("5w1s") == []


def test_the_paper_config_takes_the_releases_training_choices():
    plan = Plan(PAPER)
    member = plan.member_spec("dino_vits16", "5w1s", "amt", "separate", 0)
    assert (member.kl_direction, member.apsv_rescale, member.apsv_detach_support,
            member.apsv_loss_support) == ("clean_adv", "layer", True, "unperturbed")
    assert (member.optimizer, member.momentum, member.lr, member.epochs, member.schedule,
            member.keep) == ("sgd", 0.9, 5e-4, 30, "cosine_epoch_timm", "best")
    assert member.setting == {"variable": True, "max_ways": 5, "max_support_per_class": 1}
    pm = plan.baseline_spec("dino_vits16", "5w5s", "pm")
    assert (pm.lr, pm.epochs, pm.schedule, pm.keep) == (2.5e-5, 100, "cosine_epoch_timm_after",
                                                         "best")
    assert len(plan.validation_episodes("5w1s")) == 8
    assert DEFAULT["train"]["amt"]["kl_direction"] == "clean_adv"


def _ablations(**train_amt) -> Plan:
    """The default config training and evaluating every trained ablation."""
    config = copy.deepcopy(DEFAULT)
    config["train"]["amt"].update(train_amt)
    variants = ["amt_no_apq", "amt_no_apsv", "amt_weight_space", "amt_standard_init",
                "amt_lambda", "amt_single"]
    config["train"]["methods"] = ["pm", "lora", "amt", *variants]
    config["evaluate"]["methods"] = ["amt", *variants]
    config["evaluate"]["grids"]["amt_lambda"] = config["evaluate"]["grids"]["amt"]
    return Plan(config)


@pytest.mark.parametrize(("trained", "switch"), [
    ("amt_no_apq", {"apq": False}), ("amt_no_apsv", {"apsv": False}),
    ("amt_weight_space", {"apsv_space": "weight"}),
    ("amt_standard_init", {"lora_init": "standard"}),
])
def test_a_trained_ablation_is_amts_pool_with_its_one_switch(trained, switch):
    plan = _ablations(pool_strategies=["separate", "uniform"], lambda_adv_sweep=[1])
    assert {p["strategy"] for p in plan.pools() if p["trained"] == trained} == {"separate"}
    for member in range(3):
        amt = plan.member_spec("small_vit", "5w1s", "amt", "separate", member)
        variant = plan.member_spec("small_vit", "5w1s", trained, "separate", member)
        assert variant == dataclasses.replace(amt, **switch)  # same budgets, seeds, episodes
    assert plan.trained_artefact("small_vit", "5w1s", trained) == \
        f"results/models/small_vit/5w1s/seed0/{trained}_separate/pool.pt"


def test_the_lambda_sweep_trains_and_evaluates_one_pool_per_value():
    plan = _ablations(lambda_adv_sweep=[1, 0.5, 9])
    names = ["amt_lambda_1", "amt_lambda_0p5", "amt_lambda_9"]
    assert plan.trained_pooled == ["amt", "amt_no_apq", "amt_no_apsv", "amt_weight_space",
                                   "amt_standard_init", *names]
    specs = [plan.member_spec("small_vit", "5w5s", n, "separate", 1) for n in names]
    assert [s.lambda_adv for s in specs] == [1.0, 0.5, 9.0]
    amt = plan.member_spec("small_vit", "5w5s", "amt", "separate", 1)
    assert all(s == dataclasses.replace(amt, lambda_adv=s.lambda_adv) for s in specs)
    evaluated = {j["method"] for j in plan.evaluations()}
    assert set(names) <= evaluated and "amt_lambda" not in evaluated
    select = plan.select_spec("small_vit", "5w1s", "mnist", "amt_lambda_0p5")
    assert select.grid == DEFAULT["evaluate"]["grids"]["amt"]  # the family's grid
    assert select.model == \
        Path("results/models/small_vit/5w1s/seed0/amt_lambda_0p5_separate/pool.pt")


@pytest.mark.parametrize(("sweep", "message"), [
    (None, r"train\.amt\.lambda_adv_sweep: amt_lambda needs"),
    ([1, 6.0], r"train\.amt\.lambda_adv_sweep: 6.0 is train\.amt\.lambda_adv"),
])
def test_a_lambda_sweep_needs_its_values_and_leaves_out_amts_own(sweep, message):
    plan = _ablations(**({} if sweep is None else {"lambda_adv_sweep": sweep}))
    with pytest.raises(UserError, match=message):
        plan.specs()


def test_amt_single_is_one_adversarial_lora_at_its_budget_evaluated_without_a_pool():
    plan = _ablations(lambda_adv_sweep=[1], single_budget="2/255", attack_steps=4)
    assert {"backbone": "small_vit", "setting": "5w1s", "seed": 0, "trained": "amt_single"} in \
        plan.baselines()
    assert not [p for p in plan.pools() if p["trained"] == "amt_single"]
    spec = plan.baseline_spec("small_vit", "5w1s", "amt_single")
    assert (spec.method, spec.budgets, spec.apq, spec.apsv, spec.attack_steps) == \
        ("amt", (2 / 255,), True, True, 4)
    assert plan.trained_artefact("small_vit", "5w1s", "amt_single") == \
        "results/models/small_vit/5w1s/seed0/amt_single/model.pt"
    assert plan.selection("small_vit", "5w1s", "mnist", "amt_single") is None  # nothing tuned
    default_budget = _ablations(lambda_adv_sweep=[1]).baseline_spec("small_vit", "5w1s",
                                                                      "amt_single")
    assert default_budget.budgets == TrainConfig.budgets


def test_the_trained_ablations_take_amts_overrides_then_their_own():
    config = copy.deepcopy(_ablations(lambda_adv_sweep=[1]).config)
    config["train"]["overrides"] = {"amt": {"epochs": 5, "lr": 1.0e-3},
                                    "amt_lambda": {"lr": 2.0e-3}, "lora": {"epochs": 7}}
    plan = Plan(config)
    specs = {t: plan.member_spec("small_vit", "5w1s", t, "separate", 0)
             for t in ("amt", "amt_no_apq", "amt_lambda_1")}
    specs["amt_single"] = plan.baseline_spec("small_vit", "5w1s", "amt_single")
    assert {t: (s.epochs, s.lr) for t, s in specs.items()} == {
        "amt": (5, 1.0e-3), "amt_no_apq": (5, 1.0e-3), "amt_lambda_1": (5, 2.0e-3),
        "amt_single": (5, 1.0e-3)}
    assert plan.baseline_spec("small_vit", "5w1s", "pm").epochs == DEFAULT["train"]["epochs"]


def test_the_baselines_read_their_models_and_selections_and_the_configs_settings():
    """StyleAdv trains as a baseline of its own (SA's schedule), its and ATTNSCALE's test-time
    methods read the right artefact, the amt-based ones start from amt's selection, and Adv.
    TTF's budget and steps reach the selection specs."""
    plan = Plan(PAPER)
    where = {"backbone": "dino_vits16", "setting": "5w1s"}
    seeded = {**where, "seed": PAPER["seed"]}
    spec = plan.baseline_spec(trained="styleadv", **where)
    assert (spec.method, spec.epochs, spec.lr, spec.schedule) == \
        ("styleadv", 20, 6.25e-6, "cosine_epoch_timm_after")
    artefacts = {m: plan.trained_artefact(method=m, **where)
                 for m in ("styleadv", "styleadv_ft", "attnscale", "pmf_adv", "amt_ft_adv",
                           "attnscale_amt_ft")}
    assert artefacts["styleadv"] == artefacts["styleadv_ft"] == \
        path("model", trained="styleadv", **seeded)
    assert artefacts["attnscale"] == artefacts["pmf_adv"] == \
        path("model", trained="pm", **seeded)
    assert artefacts["amt_ft_adv"] == artefacts["attnscale_amt_ft"] == \
        path("pool", trained="amt", strategy="separate", **seeded)
    for method in ("amt_ft_adv", "attnscale_amt_ft"):
        assert plan.base_selection(domain="isic", method=method, **where) == \
            plan.selection(domain="isic", method="amt", **where)
    select = plan.select_spec(domain="isic", method="pmf_adv", **where)
    assert (select.ft_eps, select.ft_attack_steps) == ("4/255", 10)
    assert select.fixed["ft_eps"] == "4/255"
