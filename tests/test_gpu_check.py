"""bench/gpu_check.py's estimate of a config's GPU-hours, and the bench options it relies on
(bench/gpu_check.sh --cpu runs the whole check in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from amt.plan import Plan

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check, bench_train = _module("gpu_check"), _module("bench_train")


def _rates(shots: tuple[int, ...] = (1,)):
    """Round numbers: training s/episode pm 10, lora 20, apsv 30, amt 70 at 4 PGD steps;
    evaluation: pm episode 1, one forward 0.5, amt episode 3, PGD-4 adds 1 (0.25 a step),
    STr on every layer 0.1."""
    train = {"attack_steps": 4, "results": [
        {"backbone": "small_vit", "case": case, "shots": k, "seconds_median": seconds}
        for case, seconds in (("pm", 10), ("lora", 20), ("apsv", 30), ("amt", 70))
        for k in shots]}
    evaluation = {"episodes": [
        {"backbone": "small_vit", "shots": k, "pm": 1.0, "pm_work": 0.5, "amt": 3.0,
         "pgd": 4.0, "steps": 4, "trim": {"all": 0.1}} for k in shots]}
    return gpu_check.Rates(train, evaluation, "small_vit")


def _ci_config() -> dict:
    return yaml.safe_load((BENCH.parent / "configs" / "ci.yaml").read_text())


def test_estimate_of_the_ci_config_by_hand():
    """configs/ci.yaml, for each of its 2 training seeds: 4 training episodes per job (pm,
    lora, 2 amt members at 2 PGD steps),
    each job validated on 2 episodes of glyphs before training and after its 1 epoch, amt
    selected on 2 domains over 2 validation episodes (3 grid points in two stages: the clean
    episode, 2 more forwards, an STr per point), 6 evaluations of 3 test episodes (PGD-2,
    noise, one corruption; 1 sanity episode: 2 x 2 + 2 extra steps)."""
    got = gpu_check.estimate(_ci_config(), _rates())
    amt_member = 30 + 2 / 4 * (70 - 30)  # APQ's steps scaled from the bench's 4 to 2
    validation = 2 * 2 * 0.5  # 2 validations of 2 episodes, one forward each
    train = 4 * (10 + 20) + 2 * 4 * amt_member + 4 * validation
    select = 2 * 2 * (3 + 2 * 0.5 + 3 * 0.1)
    frozen = 3 * (1 + 2 * 0.25 + 2 * 0.5) + 6 * 0.25
    pool = 3 * (3 + 0.1 + 2 * 0.25 + 2 * 0.5) + 6 * 0.25
    evaluate = 2 * (2 * frozen + pool)
    train, select, evaluate = (2 * x for x in (train, select, evaluate))  # 2 seeds
    hours = got["gpu_hours"]
    assert hours["train"] * 3600 == pytest.approx(train)
    assert hours["select"] * 3600 == pytest.approx(select)
    assert hours["evaluate"] * 3600 == pytest.approx(evaluate)
    assert hours["total"] * 3600 == pytest.approx(train + select + evaluate)
    assert got["jobs"] == {"train": 8, "select": 4, "evaluate": 12}
    assert set(got["formulas"]) == {"train", "select", "evaluate", "total"}


def test_estimate_counts_test_time_fine_tuning():
    """pmf with lr in [0, 1e-3], per training seed (2): one of its two points fine-tunes (50
    steps at a pm training step each), and so does every evaluated episode."""
    config = _ci_config()
    config["evaluate"]["methods"].append("pmf")
    config["evaluate"]["grids"]["pmf"] = {"lr": [0, 1.0e-3]}
    base = gpu_check.estimate(_ci_config(), _rates())["gpu_hours"]
    got = gpu_check.estimate(config, _rates())["gpu_hours"]
    select = 2 * 2 * 2 * (1 + 0.5 + 50 * 10)
    evaluate = 2 * 2 * (3 * (1 + 50 * 10 + 2 * 0.25 + 2 * 0.5) + 6 * 0.25)
    assert (got["select"] - base["select"]) * 3600 == pytest.approx(select)
    assert (got["evaluate"] - base["evaluate"]) * 3600 == pytest.approx(evaluate)
    assert got["train"] == base["train"]


def test_estimate_names_the_missing_rate():
    config = _ci_config()
    config["settings"]["5w5s"] = {"ways": 5, "shots": 5, "queries": 5}
    config["train"]["settings"].append("5w5s")
    with pytest.raises(ValueError, match="no pm episode of 5 shots"):
        gpu_check.estimate(config, _rates())
    assert gpu_check.estimate(config, _rates((1, 5)))["jobs"]["train"] == 2 * 2 * 4  # seeds


def test_estimate_of_the_paper_config_runs_on_its_meta_dataset_training_episodes():
    got = gpu_check.estimate(yaml.safe_load(gpu_check.PAPER_CONFIG.read_text()),
                             _rates((1, 5)))
    assert got["jobs"]["train"] == 264 and got["gpu_hours"]["train"] > 0  # 24 + 240 members


def test_bench_train_measures_each_shot_count_in_the_training_dtype():
    rows = bench_train.measure("tiny_vit", "lora", [1, 3], episodes=1, min_seconds=0.0,
                               attack_steps=2, device="cpu", amp=True)
    assert [r["shots"] for r in rows] == [1, 3]
    assert all(r["dtype"] == "float32" and "peak_cuda_mib" not in r for r in rows)
    assert rows[1]["gflop"] > rows[0]["gflop"] > 0  # more support images, more work
    assert bench_train.compute_dtype("cuda:0", True) == "bfloat16"
    assert bench_train.compute_dtype("cuda:0", False) == "float32"


def test_the_workflow_step_targets_one_planned_evaluation(tmp_path):
    """bench/gpu_check.sh's workflow run asks for an evaluation the plan makes (the first
    training seed's), not a path with a wildcard left in it."""
    target = gpu_check.workflow_config("tiny_vit", "cpu", tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert target in Plan(config).rows() and "{" not in target
