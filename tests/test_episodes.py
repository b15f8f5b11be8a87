"""Samplers, the episode file and the episode Datasets on tiny synthetic domain stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amt.episode_data import EpisodeDataset, SampledEpisodeDataset
from amt.episode_files import (
    EpisodeFileError,
    check_episodes_match,
    episode_meta,
    load_episodes,
    save_episodes,
)
from amt.episodes import (
    Episode,
    FixedSampler,
    VariableSampler,
    draw_episodes,
    episode_rng,
    sampler_from_setting,
)
from amt.transforms import train_transform
from data_prep.convert import ClassSpec, StorageSettings, write_domain
from data_prep.store import DomainStore, Hierarchy

REPO = Path(__file__).resolve().parents[1]


def _image(item: tuple[int, int]) -> np.ndarray:
    """A distinct small image per (class, index), so mixed-up images would be noticed."""
    return np.random.default_rng(item).integers(0, 256, (10, 12, 3), dtype=np.uint8)


def _store(path: Path, sizes: list[int], splits: list[str], superclasses=None,
           hierarchy: Hierarchy | None = None) -> DomainStore:
    supers = superclasses or [None] * len(sizes)
    classes = [ClassSpec(f"c{k}", split, [(k, i) for i in range(size)], sup)
               for k, (size, split, sup) in enumerate(zip(sizes, splits, supers, strict=True))]
    write_domain(path, source="synthetic", converter_version="test", classes=classes,
                 load=_image, settings=StorageSettings(codec="png"), hierarchy=hierarchy)
    return DomainStore(path)


# Train classes of very different sizes (class 0 is too small for any episode), then test.
FLAT_SIZES = [1, 2, 3, 7, 15, 40, 120, 250, 600, 700] + [30] * 6
FLAT_SPLITS = ["train"] * 10 + ["test"] * 6


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> DomainStore:
    return _store(tmp_path_factory.mktemp("flat") / "flat.h5", FLAT_SIZES, FLAT_SPLITS)


@pytest.fixture(scope="module")
def two_level(tmp_path_factory) -> DomainStore:
    # Superclass A: 12 classes, B: 3 (too few for 5 ways), C: 6; D (test): 7.
    supers = ["A"] * 12 + ["B"] * 3 + ["C"] * 6 + ["D"] * 7
    splits = ["train"] * 21 + ["test"] * 7
    sizes = [20 + k for k in range(28)]
    return _store(tmp_path_factory.mktemp("two") / "two.h5", sizes, splits, supers)


# Nodes: 0 root, 1 animals, 2 dogs, 3 cats, 4 tools, 5 single (one child: collapsed), 6 mini,
# 7 test_root. Class 9 has two parents (dogs, tools); class 3 has one image (never usable).
DAG_EDGES = ([(0, 1), (0, 4), (0, 7), (1, 2), (1, 3), (4, 5), (5, 6)]
             + [(2, -c - 1) for c in (0, 1, 2, 3, 4, 5, 9)]
             + [(3, -c - 1) for c in (6, 7, 8)]
             + [(4, -c - 1) for c in range(9, 16)]
             + [(6, -c - 1) for c in range(16, 22)]
             + [(7, -c - 1) for c in range(22, 30)])
DAG_TRAIN_GROUPS = [  # the internal nodes spanning >= 5 usable train classes, in node order
    [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],  # root
    [0, 1, 2, 4, 5, 6, 7, 8, 9],  # animals
    [0, 1, 2, 4, 5, 9],  # dogs
    list(range(9, 22)),  # tools
    list(range(16, 22)),  # mini (single is collapsed into it)
]


@pytest.fixture(scope="module")
def dag(tmp_path_factory) -> DomainStore:
    names = ("root", "animals", "dogs", "cats", "tools", "single", "mini", "test_root")
    hierarchy = Hierarchy("dag", names, edges=np.array(DAG_EDGES))
    sizes = [12] * 30
    sizes[3] = 1
    splits = ["train"] * 22 + ["test"] * 8
    return _store(tmp_path_factory.mktemp("dag") / "dag.h5", sizes, splits, hierarchy=hierarchy)


def _check_common(store: DomainStore, split: str, episode: Episode) -> None:
    """Rules every episode obeys: classes of the split, images of their class, no reuse."""
    assert set(episode.classes.tolist()) <= set(store.classes_in_split(split).tolist())
    assert np.array_equal(store.labels[episode.support], episode.classes[episode.support_labels])
    assert np.array_equal(store.labels[episode.query], episode.classes[episode.query_labels])
    assert not set(episode.support.tolist()) & set(episode.query.tolist())


def _check_variable_sizes(store: DomainStore, episode: Episode) -> None:
    sizes = store.class_sizes[episode.classes]
    queries = min(10, int(sizes.min()) // 2)
    assert np.all(episode.queries == queries)
    shots = episode.shots
    assert np.all(shots >= 1) and np.all(shots <= sizes - queries)
    remaining = sizes - queries
    # Each class adds at most min(100, remaining) + 1 to the support size, which is <= 500.
    assert shots.sum() <= min(500, int(np.minimum(100, remaining).sum()) + episode.ways)


def test_variable_sampler_rules_on_classes_of_very_different_sizes(flat):
    episodes = draw_episodes(flat, "train", VariableSampler(), 300, seed=3)
    ways = []
    for episode in episodes:
        _check_common(flat, "train", episode)
        _check_variable_sizes(flat, episode)
        assert 0 not in episode.classes  # one image: cannot give a support and a query
        ways.append(episode.ways)
    assert min(ways) == 5 and max(ways) == 9  # U[5, min(50, 9 usable classes)]
    # Shots follow class size: the 600/700-image classes get far more than the 2-image class.
    big = [e.shots[list(e.classes).index(9)] for e in episodes if 9 in e.classes]
    assert max(big) > 100  # the 100 cap limits the support size contribution, not the shots
    sizes = [e.shots.sum() for e in episodes]
    assert max(sizes) <= 500 and min(sizes) < 30


class _Scripted:
    """A generator stand-in returning chosen values, to check the formulas by hand."""

    def __init__(self, *values) -> None:
        self.values = list(values)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self.values.pop(0)


def test_support_size_and_shots_follow_the_meta_dataset_formulas():
    sampler = VariableSampler()
    remaining = np.array([5, 150, 30])
    # beta 0.5: floor(0.5 * min(100, r) + 1) per class: 3 + 51 + 16.
    assert sampler._support_size(remaining, _Scripted(0.5)) == 70
    assert sampler._support_size(np.full(40, 200), _Scripted(0.99)) == 500  # capped at 500
    # Equal log-weights: shares 10/210, 160/210, 40/210 of 70 - 3; then capped at remaining.
    shots = sampler._shots(np.array([10, 160, 40]), remaining, 70, _Scripted(np.zeros(3)))
    assert shots.tolist() == [4, 52, 13]
    shots = sampler._shots(np.array([10, 160, 40]), np.array([2, 150, 30]), 70,
                           _Scripted(np.log([2.0, 0.5, 1.0])))
    assert shots.tolist() == [2, 39, 20]  # 20/140, 80/140, 40/140 of 67; the first capped at 2


def test_two_level_episodes_stay_within_one_superclass(two_level):
    parent = two_level.hierarchy.class_parent
    seen = {}
    for episode in draw_episodes(two_level, "train", VariableSampler(), 300, seed=5):
        _check_common(two_level, "train", episode)
        _check_variable_sizes(two_level, episode)
        supers = set(parent[episode.classes].tolist())
        assert len(supers) == 1
        seen.setdefault(supers.pop(), set()).add(episode.ways)
    names = two_level.hierarchy.node_names
    assert {names[s] for s in seen} == {"A", "C"}  # B has only 3 classes
    assert seen[names.index("A")] == set(range(5, 13))  # U[5, 12 characters of A]
    assert seen[names.index("C")] == {5, 6}


def test_dag_groups_are_the_split_subgraph_nodes(dag):
    kind, groups = VariableSampler().check(dag, "train")
    assert kind == "dag"
    assert [g.tolist() for g in groups] == DAG_TRAIN_GROUPS
    _, test_groups = VariableSampler().check(dag, "test")
    assert [g.tolist() for g in test_groups] == [list(range(22, 30))]  # root is collapsed
    _, narrow = VariableSampler(max_spanning_leaves=12).check(dag, "train")
    assert [g.tolist() for g in narrow] == [DAG_TRAIN_GROUPS[i] for i in (1, 2, 4)]


def test_dag_episodes_use_the_leaves_of_one_node(dag):
    groups = [set(g) for g in DAG_TRAIN_GROUPS]
    chosen = set()
    for episode in draw_episodes(dag, "train", VariableSampler(max_ways=8), 200, seed=9):
        _check_common(dag, "train", episode)
        _check_variable_sizes(dag, episode)
        classes = set(episode.classes.tolist())
        under = [i for i, g in enumerate(groups) if classes <= g]
        assert under, f"classes {classes} are under no single node"
        # A node is used whole, or sub-sampled to max_ways when it spans more.
        assert any(classes == groups[i] for i in under) or episode.ways == 8
        chosen.add(min(under, key=lambda i: len(groups[i])))
    assert chosen == set(range(5))


# The training settings of configs/paper.yaml: Meta-Dataset's sampler with ways capped at 5 and
# one support image's contribution per class (the release's 5w1s validation file rule), and the
# same with 5 support images per class.
MD_5W1S = {"variable": True, "max_ways": 5, "max_support_per_class": 1}
MD_5W5S = {"variable": True, "max_ways": 5, "num_support": 5}


@pytest.mark.parametrize("store_name", ["flat", "two_level", "dag"])
def test_meta_dataset_5_way_1_shot_episodes(store_name, request):
    store = request.getfixturevalue(store_name)
    sampler = sampler_from_setting(MD_5W1S)
    for episode in draw_episodes(store, "train", sampler, 100, seed=3):
        _check_common(store, "train", episode)
        assert episode.ways == 5 and episode.shots.tolist() == [1] * 5
        queries = min(10, int(store.class_sizes[episode.classes].min()) // 2)
        assert episode.queries.tolist() == [queries] * 5 and queries <= 10


def test_meta_dataset_5_way_5_shot_episodes_on_the_dag(dag):
    groups = [set(g) for g in DAG_TRAIN_GROUPS]
    sampler = sampler_from_setting(MD_5W5S)
    for episode in draw_episodes(dag, "train", sampler, 100, seed=4):
        _check_common(dag, "train", episode)
        assert episode.ways == 5 and episode.shots.tolist() == [5] * 5
        assert episode.queries.tolist() == [min(10, 12 - 5)] * 5  # the smallest class - shots
        assert any(set(episode.classes.tolist()) <= g for g in groups)  # under one node
    with pytest.raises(ValueError, match="at least 13 images"):
        VariableSampler(num_support=12).check(dag, "train")


def test_fixed_sampler_counts_and_eligible_classes(flat):
    sampler = FixedSampler(ways=5, shots=5, queries=15)
    for episode in draw_episodes(flat, "train", sampler, 100, seed=1):
        _check_common(flat, "train", episode)
        assert episode.ways == 5
        assert episode.shots.tolist() == [5] * 5 and episode.queries.tolist() == [15] * 5
        assert np.all(flat.class_sizes[episode.classes] >= 20)
    with pytest.raises(ValueError, match=r"split 'train' has 4 classes with at least 41.*ways=5"):
        FixedSampler(ways=5, shots=6, queries=35).sample(flat, "train", episode_rng(0))
    with pytest.raises(ValueError, match="split 'valid' has 0 classes"):
        draw_episodes(flat, "valid", sampler, 1, seed=0)


def test_variable_sampler_errors_name_the_split(flat, two_level):
    with pytest.raises(ValueError, match=r"split 'test' cannot give a flat .*min_ways=7"):
        VariableSampler(min_ways=7).check(flat, "test")
    with pytest.raises(ValueError, match="superclass/node has min_ways=13"):
        VariableSampler(min_ways=13, max_ways=13).check(two_level, "train")


def test_episode_rng_is_keyed_and_validated():
    a = episode_rng(7, 3, "omniglot").integers(1 << 30, size=4)
    assert np.array_equal(a, episode_rng(7, 3, "omniglot").integers(1 << 30, size=4))
    assert not np.array_equal(a, episode_rng(7, 3, "aircraft").integers(1 << 30, size=4))
    assert not np.array_equal(a, episode_rng(8, 3, "omniglot").integers(1 << 30, size=4))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="expected a non-negative int or a str"):
            episode_rng(0, bad)


def _episodes_json(path: Path, seed: int) -> str:
    store = DomainStore(path)
    episodes = draw_episodes(store, "train", VariableSampler(), 20, seed)
    return json.dumps([[e.classes.tolist(), e.support.tolist(), e.query.tolist()]
                       for e in episodes])


def test_draws_are_identical_in_another_process(flat):
    code = ("import sys; from pathlib import Path; from tests.test_episodes import _episodes_json;"
            f" print(_episodes_json(Path({str(flat.path)!r}), 11))")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert child.stdout.strip() == _episodes_json(flat.path, 11)
    assert _episodes_json(flat.path, 12) != _episodes_json(flat.path, 11)


def test_save_load_round_trip(flat, tmp_path):
    sampler = VariableSampler()
    episodes = draw_episodes(flat, "train", sampler, 25, seed=2)
    meta = episode_meta(flat, domain="flat", split="train", sampler=sampler, seed=2, count=25)
    path = tmp_path / "episodes.json"
    save_episodes(path, episodes, meta)
    assert not (tmp_path / "episodes.json.partial").exists()
    loaded, loaded_meta = load_episodes(path)
    assert loaded == episodes and loaded_meta == meta
    assert sampler_from_setting(loaded_meta["setting"]) == sampler
    check_episodes_match(flat, loaded_meta)  # the same store: no error


def _edit(path: Path, change) -> Path:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def _set_first(key: str, value):
    return lambda d: d["episodes"][0].__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.__setitem__("format", "other"), "not an 'amt-episodes' file"),
    (lambda d: d.__setitem__("format_version", 9), "format version 9"),
    (lambda d: d["meta"].pop("seed"), "meta must be a mapping with keys"),
    (lambda d: d["episodes"].pop(), "meta count 3 but 2 episodes"),
    (_set_first("query", [[0]]), "episode 0: episode: 2 classes but 2 support and 1 query"),
    (_set_first("support", [[-4], [5]]), "episode 0: support: expected a non-empty list"),
    (_set_first("support", [["7"], [5]]), "episode 0: support: expected a non-empty list"),
    (lambda d: d["episodes"][1].pop("query"), "episode 1: expected an object with exactly"),
])
def test_load_rejects_malformed_files(tmp_path, change, message):
    episodes = [Episode.from_groups([1, 2], [[3], [5]], [[4], [6]])] * 3
    meta = {"domain": "d", "split": "test", "setting": {"ways": 2, "shots": 1, "queries": 1},
            "seed": 0, "count": 3, "num_images": 9, "num_classes": 3, "class_sizes_crc32": 1}
    path = tmp_path / "e.json"
    save_episodes(path, episodes, meta)
    _edit(path, change)
    with pytest.raises(EpisodeFileError, match=message) as info:
        load_episodes(path)
    assert str(path) in str(info.value)


def test_load_rejects_truncated_file_and_overlap(tmp_path):
    path = tmp_path / "e.json"
    path.write_text('{"format": "amt-episodes", "episodes": [')
    with pytest.raises(EpisodeFileError, match="not a readable JSON episode file"):
        load_episodes(path)
    meta = {"domain": "d", "split": "test", "setting": {}, "seed": 0, "count": 1,
            "num_images": 9, "num_classes": 3, "class_sizes_crc32": 1}
    save_episodes(path, [Episode.from_groups([1, 2], [[3], [5]], [[4], [6]])], meta)
    _edit(path, _set_first("query", [[3], [6]]))
    with pytest.raises(EpisodeFileError, match="an image appears twice"):
        load_episodes(path)


def test_stale_episode_file_is_detected(tmp_path, flat):
    sampler = FixedSampler(5, 1, 2)
    meta = episode_meta(flat, domain="flat", split="test", sampler=sampler, seed=0, count=0)
    sizes = list(FLAT_SIZES)
    sizes[4], sizes[5] = sizes[5], sizes[4]  # same counts, different class sizes
    reconverted = _store(tmp_path / "again.h5", sizes, FLAT_SPLITS)
    with pytest.raises(EpisodeFileError, match="another version of .*class_sizes_crc32"):
        check_episodes_match(reconverted, meta)
    smaller = _store(tmp_path / "smaller.h5", FLAT_SIZES[:-1], FLAT_SPLITS[:-1])
    with pytest.raises(EpisodeFileError, match="num_images 1918 vs 1888"):
        check_episodes_match(smaller, meta)


def test_episode_validates_its_structure():
    with pytest.raises(ValueError, match="an image appears twice"):
        Episode.from_groups([0, 1], [[1], [2]], [[3], [1]])
    with pytest.raises(ValueError, match="expected labels grouped"):
        Episode(np.array([4, 5]), np.array([0, 1]), np.array([1, 0]), np.array([2, 3]),
                np.array([0, 1]))
    with pytest.raises(ValueError, match="expected distinct ids"):
        Episode.from_groups([4, 4], [[0], [1]], [[2], [3]])


def test_sampler_from_setting():
    assert sampler_from_setting({"ways": 5, "shots": 1, "queries": 15}) == FixedSampler(5, 1, 15)
    variable = sampler_from_setting({"variable": True, "max_ways": 20})
    assert variable == VariableSampler(max_ways=20)
    for sampler in (FixedSampler(5, 5, 15), variable, VariableSampler(num_support=3)):
        assert sampler_from_setting(json.loads(json.dumps(sampler.setting()))) == sampler
    with pytest.raises(ValueError, match=r"key 'way' is not allowed.*'ways', 'shots'"):
        sampler_from_setting({"way": 5, "shots": 1, "queries": 15})
    with pytest.raises(ValueError, match="key 'shots' is not allowed with variable=true"):
        sampler_from_setting({"variable": True, "shots": 1})
    with pytest.raises(ValueError, match=r"missing \['queries'\]"):
        sampler_from_setting({"ways": 5, "shots": 1})
    with pytest.raises(ValueError, match="ways=0: expected an int >= 1"):
        sampler_from_setting({"ways": 0, "shots": 1, "queries": 1})


def _all_items(dataset, workers: int) -> list:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [tuple(t.clone() for t in item) for item in loader]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def test_episode_dataset_same_with_and_without_workers(flat):
    episodes = draw_episodes(flat, "test", FixedSampler(3, 2, 2), 4, seed=0)
    dataset = EpisodeDataset(flat, episodes, train_transform(image_size=16), seed=4)
    serial = _all_items(dataset, 0)
    _assert_same(serial, _all_items(dataset, 2))
    xs, ys, xq, yq = serial[0]
    assert xs.shape == (6, 3, 16, 16) and xq.shape == (6, 3, 16, 16)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.dtype == torch.int64
    # Image p of item i is transformed with episode_rng(seed, i, p), support first then query.
    transform = train_transform(image_size=16)
    episode = episodes[2]
    for p, image in ((0, episode.support[0]), (5, episode.support[5]), (6, episode.query[0])):
        expected = transform(flat.read(int(image)), episode_rng(4, 2, p))
        got = serial[2][0][p] if p < 6 else serial[2][2][p - 6]
        assert torch.equal(got, expected)
    other = EpisodeDataset(flat, episodes, transform, seed=5)[0]
    assert not torch.equal(other[0], xs)


def test_sampled_dataset_multi_source(flat, two_level):
    sampler = FixedSampler(5, 1, 2)
    dataset = SampledEpisodeDataset([flat, two_level], "train", sampler,
                                    train_transform(image_size=8), seed=1, length=6)
    _assert_same(_all_items(dataset, 0), _all_items(dataset, 2))
    longer = SampledEpisodeDataset([flat, two_level], "train", sampler,
                                   train_transform(image_size=8), seed=1, length=40)
    sources = [longer.episode(i)[0] for i in range(40)]
    assert 10 < sum(sources) < 30  # both sources, about half each
    single = SampledEpisodeDataset([flat], "train", sampler, train_transform(), seed=1, length=5)
    assert [single.episode(i)[1] for i in range(5)] == draw_episodes(flat, "train", sampler, 5, 1)
    with pytest.raises(ValueError, match="split 'valid' has 0 classes"):
        SampledEpisodeDataset([flat], "valid", sampler, train_transform(), seed=1, length=5)


def test_training_validation_episodes_come_from_the_valid_split_only(tmp_path):
    import argparse

    from amt.episode_files import register
    from amt.errors import UserError

    path = tmp_path / "d.h5"
    _store(path, [6] * 16, ["train"] * 8 + ["valid"] * 3 + ["test"] * 5)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def draw(kind: str, ways: int) -> str:
        out = tmp_path / f"{kind}_{ways}.json"
        args = parser.parse_args([
            "episodes", "--store", str(path), "--domain", "d", "--kind", kind,
            "--setting-name", "s", "--setting", json.dumps({"ways": ways, "shots": 1,
                                                            "queries": 2}),
            "--count", "2", "--seed", "0", "--out", str(out)])
        assert args.func(args) == 0
        return load_episodes(out)[1]["split"]

    assert draw("train_valid", 3) == "valid"
    assert draw("valid", 5) == "test"  # selection falls back to the test classes
    with pytest.raises(UserError, match=r"d train_valid episodes: .*split 'valid' has 3 "
                                        r"classes.*train\.validation\.domains"):
        draw("train_valid", 5)  # a run's validation never does
