"""ilsvrc_2012: Meta-Dataset's WordNet split, per-split collapsed subgraphs, stored DAG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fixtures_metadataset import full_imagenet, imagenet_tree

from data_prep.sources import ilsvrc_2012
from data_prep.sources.common import LayoutError
from data_prep.sources.metadataset_common import reference_text
from data_prep.store import DomainStore

WORDS = {
    "n00001740": "entity", "n00002137": "abstraction", "n06000000": "unrelated",
    "n00015388": "animal", "n01503061": "bird", "n02075296": "carnivore", "n02512053": "fish",
    "n02084071": "dog", "n02121620": "cat", "n02121808": "domestic cat",
    "n03575240": "instrumentality", "n03183080": "device", "n03800933": "musical instrument",
    "n04576211": "wheeled vehicle",
    # classes
    "n01531178": "goldfinch", "n01537544": "indigo bunting", "n01580077": "jay",
    "n02085620": "Chihuahua", "n02085782": "Japanese spaniel", "n02123045": "tabby",
    "n01440764": "tench", "n02666196": "abacus", "n02672831": "accordion",
    "n02676566": "acoustic guitar", "n02835271": "bicycle-built-for-two",
    "n03792782": "mountain bike",
}
IS_A = [
    ("n00001740", "n00015388"), ("n00001740", "n03575240"), ("n00001740", "n00002137"),
    ("n00002137", "n06000000"),  # a branch without classes: not part of the graph
    ("n00015388", "n01503061"), ("n00015388", "n02075296"), ("n00015388", "n02512053"),
    ("n01503061", "n01531178"), ("n01503061", "n01537544"), ("n01503061", "n01580077"),
    ("n02075296", "n02084071"), ("n02075296", "n02121620"),
    ("n02084071", "n02085620"), ("n02084071", "n02085782"),
    ("n02121620", "n02121808"), ("n02121808", "n02123045"),  # single-child chain: collapsed
    ("n02512053", "n01440764"),  # fish -> tench only: collapsed
    ("n03575240", "n03183080"), ("n03575240", "n04576211"), ("n03575240", "n03800933"),
    ("n03183080", "n02666196"), ("n03183080", "n02672831"),
    ("n03800933", "n02672831"), ("n03800933", "n02676566"),  # accordion has two parents
    ("n04576211", "n02835271"), ("n04576211", "n03792782"),
]
CLASSES = ["n01440764", "n01531178", "n01537544", "n01580077", "n02085620", "n02085782",
           "n02123045", "n02666196", "n02672831", "n02676566", "n02835271", "n03792782"]


def small_tree(tmp: Path) -> Path:
    files = {wnid: [f"{wnid}_1.JPEG", f"{wnid}_2.JPEG"] for wnid in CLASSES}
    files["n01531178"].append("n01531178_12730.JPEG")  # in ImageNet_CUBirds_duplicates.txt
    return imagenet_tree(tmp, IS_A, WORDS, files)


def named_edges(store: DomainStore) -> set[tuple[str, str]]:
    h = store.hierarchy
    return {(h.node_names[p], h.node_names[c] if c >= 0 else store.class_names[-c - 1])
            for p, c in h.edges.tolist()}


def test_small_wordnet_split_and_dag(tmp_path, caplog):
    out = tmp_path / "imagenet.h5"
    with caplog.at_level(logging.WARNING):
        report = ilsvrc_2012.convert(small_tree(tmp_path), out)
    store = DomainStore(out)
    assert store.class_names == [  # sorted synset ids within each split
        "n01440764", "n01531178", "n01537544", "n01580077", "n02676566", "n02835271",
        "n03792782",  # train
        "n02085620", "n02085782", "n02123045",  # valid: under carnivore
        "n02666196", "n02672831"]  # test: under device (accordion also under music)
    assert [len(store.classes_in_split(s)) for s in ("train", "valid", "test")] == [7, 3, 2]
    assert store.class_sizes.tolist() == [2] * 12 and report.images == 24
    assert store.attrs["settings"]["duplicates_excluded"] == 1
    assert "988 of 1000 Meta-Dataset classes are missing" in caplog.text
    assert store.hierarchy.kind == "dag"
    assert store.hierarchy.node_names == (  # internal nodes: train, valid, test subgraphs
        "n00001740", "n00015388", "n01503061", "n03575240", "n04576211",
        "n02075296", "n02084071", "n03183080")
    assert named_edges(store) == {
        # train: fish and (here) musical instrument have one train child and are collapsed
        ("n00001740", "n00015388"), ("n00001740", "n03575240"),
        ("n00015388", "n01440764"), ("n00015388", "n01503061"),
        ("n01503061", "n01531178"), ("n01503061", "n01537544"), ("n01503061", "n01580077"),
        ("n03575240", "n02676566"), ("n03575240", "n04576211"),
        ("n04576211", "n02835271"), ("n04576211", "n03792782"),
        # valid: rooted at carnivore; the cat -> domestic cat chain is collapsed
        ("n02075296", "n02084071"), ("n02075296", "n02123045"),
        ("n02084071", "n02085620"), ("n02084071", "n02085782"),
        # test: rooted at device
        ("n03183080", "n02666196"), ("n03183080", "n02672831")}
    assert store.attrs["settings"]["dag_nodes"] == {"train": 5, "valid": 2, "test": 1}


def test_full_imagenet_dag_equals_meta_dataset_subgraphs(tmp_path):
    out = tmp_path / "imagenet.h5"
    ilsvrc_2012.convert(full_imagenet(tmp_path), out)
    store = DomainStore(out)
    spec = json.loads(reference_text("dataset_specs/ilsvrc_2012_dataset_spec.json"))
    nodes = [n for split in spec["split_subgraphs"].values() for n in split]
    assert named_edges(store) == {(n["wn_id"], c) for n in nodes for c in n["children_ids"]}
    assert set(store.hierarchy.node_names) == {n["wn_id"] for n in nodes if n["children_ids"]}
    assert store.attrs["settings"]["dag_nodes"] == {"train": 1011 - 712, "valid": 200 - 158,
                                                    "test": 180 - 130}


def test_collapse_bridges_single_child_chains():
    graph = {"r": {"a", "x"}, "a": {"b"}, "b": {"c"}, "c": {"d", "e"}, "d": set(), "e": set(),
             "x": set()}
    assert ilsvrc_2012.collapse(graph) == {"r": {"c", "x"}, "c": {"d", "e"}, "d": set(),
                                           "e": set(), "x": set()}


def test_class_that_is_an_ancestor_of_another_class(tmp_path):
    files = {w: [f"{w}_1.JPEG"] for w in CLASSES + ["n02084071"]}  # dog is a class too
    with pytest.raises(ValueError, match="n02084071 is an ancestor of other class synsets"):
        ilsvrc_2012.convert(imagenet_tree(tmp_path, IS_A, WORDS, files), tmp_path / "o.h5")


def test_folders_must_be_extracted_synsets(tmp_path):
    raw = imagenet_tree(tmp_path, IS_A, WORDS, {})
    (raw / "n01440764.tar").write_bytes(b"tar")
    with pytest.raises(LayoutError, match="no class folders.*extract each"):
        ilsvrc_2012.convert(raw, tmp_path / "o.h5")
    (raw / "train_cache").mkdir()
    with pytest.raises(LayoutError, match="not WordNet synsets.*'train_cache'"):
        ilsvrc_2012.convert(raw, tmp_path / "o.h5")
