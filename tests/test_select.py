"""Per-domain hyperparameter selection on validation episodes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from builders import make_episodes, make_pool, model_file, template_domain

from amt.evaluate import evaluate
from amt.select import register, select
from amt.selections import read_selection
from amt.specs import EvalConfig, SelectConfig, grid_points

pytestmark = pytest.mark.usefixtures("one_thread")
TRIM_ALL = {"layers": "all", "ratio": 0.05}  # keeps 1 of 32 singular values: destroys features


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("select")
    torch.set_num_threads(1)
    pool = make_pool(folder, members=3)
    store = template_domain(folder / "domain.h5")
    return {"pool": pool, "store": store, "folder": folder,
            "pm": model_file(folder, folder / "tiny_backbone.pth", "pm", method="pm"),
            "episodes": make_episodes(store, folder / "valid.json", count=4, ways=5, seed=1)}


def _config(files, out: Path, method: str, grid: dict, **overrides) -> SelectConfig:
    model = files["pm"] if method == "pmf" else files["pool"]
    return SelectConfig(method=method, model=model, store=files["store"],
                        episodes=files["episodes"], grid=grid, out=out, device="cpu",
                        **overrides)


def test_select_picks_the_clearly_best_point_and_records_the_grid(files, tmp_path):
    grid = {"str": [TRIM_ALL, "none"], "gamma": [0.6, 0.4], "beta": [1.0], "top_k": [2]}
    result = select(_config(files, tmp_path / "sel.json", "amt", grid))
    points = {(p["point"]["str_layers"], p["point"]["gamma"]): p for p in result["points"]}
    assert len(points) == 4 and all(len(p["episode_accuracy"]) == 4 for p in points.values())
    assert result["best_point"] == {"str_layers": "none", "str_ratio": 1.0, "gamma": 0.6,
                                    "beta": 1.0, "top_k": 2}
    trimmed = max(points[("all", g)]["accuracy"] for g in (0.6, 0.4))
    assert result["best_accuracy"] >= trimmed + 0.2
    hyper = read_selection(tmp_path / "sel.json", "amt", files["pool"])
    assert (hyper.str_layers, hyper.gamma, hyper.beta, hyper.top_k) == ("none", 0.6, 1.0, 2)

    # the recorded scores are the accuracies evaluate() measures with the chosen values
    rows = evaluate(EvalConfig(
        method="amt", model=files["pool"], store=files["store"], episodes=files["episodes"],
        benchmark="b", domain="d", in_domain=False, setting_name="5w1s", out=tmp_path / "e.csv",
        selection=tmp_path / "sel.json", device="cpu"))
    assert rows.accuracy.tolist() == points[("none", 0.6)]["episode_accuracy"]


def test_points_with_the_same_merge_share_one_evaluation(files, tmp_path, monkeypatch):
    from amt.methods import PoolMethod

    adapts = []
    original = PoolMethod.adapt

    def counting(self, *args, **kwargs):
        adapts.append(kwargs.get("plan"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PoolMethod, "adapt", counting)
    grid = {"beta": [0.5, 1.0, 4.0], "top_k": [1], "gamma": [0.6], "str": ["none"]}
    result = select(_config(files, tmp_path / "sel.json", "amt", grid))
    assert len(adapts) == 4  # one per validation episode
    assert len({p["accuracy"] for p in result["points"]}) == 1
    assert result["best_point"]["beta"] == 0.5  # at top_k 1 the weights ignore beta


def test_stages_are_searched_in_turn_at_the_best_point_of_those_before(files, tmp_path,
                                                                      monkeypatch):
    """The release's order: gamma (beta, k fixed) first, then STr at the chosen gamma; 3 + 2
    points, not 3 x 2, and the member scores once per episode for both stages."""
    from amt.methods import PoolMethod

    scored = []
    original = PoolMethod.scores
    monkeypatch.setattr(PoolMethod, "scores", lambda self, xs, ys, index: scored.append(index)
                        or original(self, xs, ys, index))
    grid = [{"gamma": [0.6, 0.4, 0.0], "beta": [1.0], "top_k": [2]}, {"str": [TRIM_ALL, "none"]}]
    result = select(_config(files, tmp_path / "sel.json", "amt", grid,
                            str_solver="lowrank"))
    assert sorted(scored) == [0, 1, 2, 3]
    first = [p for p in result["points"] if p["stage"] == 0]
    second = [p for p in result["points"] if p["stage"] == 1]
    assert len(first) == 3 and [set(p["point"]) for p in second] == [{"str_layers",
                                                                      "str_ratio"}] * 2
    best = max(first, key=lambda p: p["accuracy"])  # the first of equal maxima
    assert best is next(p for p in first if p["accuracy"] == best["accuracy"])
    # stage 1's "none" point is stage 0's best point again (STr none is the base's)
    assert second[1]["episode_accuracy"] == best["episode_accuracy"]
    assert result["best_point"] == {**best["point"], "str_layers": "none", "str_ratio": 1.0}
    assert result["hyperparameters"]["str_solver"] == "lowrank"
    assert result["best_accuracy"] == second[1]["accuracy"]
    assert set(result["selected"]) == {"beta", "gamma", "top_k", "str_layers", "str_ratio"}


def test_finetuning_lr_is_selected_on_top_of_a_merge_selection(files, tmp_path):
    with pytest.raises(ValueError, match=r"amt uses \['beta', 'gamma', 'str_layers', 'str_"):
        select(_config(files, tmp_path / "amt.json", "amt", {"top_k": [2]}))
    with pytest.raises(ValueError, match=r"amt_ft uses \['beta', 'gamma', 'top_k'"):
        select(_config(files, tmp_path / "ft.json", "amt_ft", {"lr": [0.0]}))
    merge = select(_config(files, tmp_path / "amt.json", "amt",
                           {"beta": [1.0], "gamma": [0.6], "top_k": [2], "str": ["none"]}))
    assert set(merge["selected"]) == {"beta", "gamma", "top_k", "str_layers", "str_ratio"}
    result = select(_config(files, tmp_path / "ft.json", "amt_ft", {"lr": [30.0, 0.0]},
                            base_selection=tmp_path / "amt.json", ft_steps=2))
    assert result["best_point"] == {"lr": 0.0}  # lr 30 wrecks the backbone in two Adam steps
    assert result["hyperparameters"]["ft_steps"] == 2
    assert read_selection(tmp_path / "ft.json", "amt_ft", files["pool"]).top_k == 2
    with pytest.raises(ValueError, match=r"also needs \['lr'\]"):
        read_selection(tmp_path / "amt.json", "amt_ft", files["pool"])


@pytest.mark.parametrize(("method", "grid", "message"), [
    ("amt", {"alpha": [1]}, r"keys \['alpha'\] are unknown or not used"),
    ("amt_weight_avg", {"beta": [1]}, r"keys \['beta'\] .* amt_weight_avg, which uses"),
    ("amt", {"beta": []}, "non-empty list"),
    ("amt", {"gamma": [1.5]}, "gamma=1.5: expected a number in"),
    ("amt", {"str": [{"layers": "fc2", "ratio": 0.5}]}, "str_layers='fc2'"),
    ("amt", {"str": ["half"]}, "STr value 'half'"),
    ("amt", [{"beta": [1]}, {"beta": [2], "gamma": [0.6]}],
     r"keys \['beta'\] appear in more than one stage"),
    ("amt", [{"beta": [1]}, {"lr": [0]}], r"--grid\[1\]: keys \['lr'\] are unknown or not used"),
    ("amt", [], "an object of value lists or a list of them"),
])
def test_bad_grids_are_named(method, grid, message):
    with pytest.raises(ValueError, match=message):
        grid_points(grid, method)


def test_select_command_for_pmf(files, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "select", "--method", "pmf", "--model", str(files["pm"]), "--store",
        str(files["store"]), "--episodes", str(files["episodes"]), "--grid",
        '{"lr": [0.0, 30.0]}', "--ft-steps", "1", "--device", "cpu", "--out",
        str(tmp_path / "pmf.json")])
    assert args.func(args) == 0
    assert read_selection(tmp_path / "pmf.json", "pmf", files["pm"]).lr == 0.0
