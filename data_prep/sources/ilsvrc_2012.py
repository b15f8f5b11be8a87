"""ILSVRC-2012 train (Meta-Dataset source ``ilsvrc_2012``): 1,000 synsets split on the WordNet DAG.

Reproduces Meta-Dataset's imagenet_specification:
1. the sampling graph = the 1,000 class synsets and all their WordNet ancestors (is-a links of
   wordnet.is_a.txt restricted to these nodes), then every node with exactly one child is
   removed and its child attached to its parents;
2. valid = the classes under n02075296 (carnivore), test = those under n03183080 (device),
   train = the rest; class ids are the sorted synset ids of each split, train -> valid -> test;
3. each split gets its own subgraph of that sampling graph: its classes and their ancestors
   (for valid/test only the root and its descendants), collapsed again the same way.
The three subgraphs share no internal node; they are stored together as one 'dag' hierarchy
(node = internal synset, edge = is-a link), so a sampler picks the internal nodes of a split's
subgraph as the nodes whose leaves are classes of that split. Images listed in the three
ImageNet_*_duplicates.txt files (also in Caltech-101/256 or CUB) are left out, matched by file
name as Meta-Dataset does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.convert import ClassSpec, ConversionReport, StorageSettings
from data_prep.sources.common import class_folders, require
from data_prep.sources.metadataset_common import (
    class_files,
    find_root,
    imagenet_duplicates,
    layout_error,
    load_rgb,
    write_metadataset,
)
from data_prep.store import SPLITS, Hierarchy

SOURCE = "ilsvrc_2012"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
ILSVRC2012_img_train/          <- --raw (ILSVRC2012_img_train.tar, unpacked)
  n01440764/*.JPEG ...         1,000 synset folders (extract each n????????.tar into its own)
  wordnet.is_a.txt             https://image-net.org/archive/wordnet.is_a.txt
  words.txt                    https://image-net.org/archive/words.txt"""
ROOTS = {"valid": "n02075296", "test": "n03183080"}  # carnivore, device

Graph = dict[str, set[str]]  # node -> children


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "wordnet.is_a.txt", ("ILSVRC2012_img_train",))
    synsets = read_words(require(root / "words.txt", SOURCE, LAYOUT))
    wordnet = read_is_a(root / "wordnet.is_a.txt", synsets)
    folders = {folder.name: folder for folder in class_folders(root)}
    _check_folders(root, folders, synsets)
    splits = split_graphs(wordnet, sorted(folders))
    duplicates = imagenet_duplicates()
    classes, excluded = [], 0
    for split in SPLITS:
        for wnid in splits.classes[split]:
            files = class_files(folders[wnid])
            kept = [f for f in files if os.path.basename(f) not in duplicates]
            excluded += len(files) - len(kept)
            classes.append(ClassSpec(wnid, split, kept))
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=classes, load=load_rgb,
        split_source=f"WordNet: valid under {ROOTS['valid']}, test under {ROOTS['test']}",
        workers=workers, settings=settings, hierarchy=splits.hierarchy(),
        extra={"duplicates_excluded": excluded,
               "dag_nodes": {s: len(splits.internal(s)) for s in SPLITS}})


def read_words(path: Path) -> set[str]:
    """Synset ids of words.txt ("<wnid>\\t<words>" per line)."""
    synsets = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        wnid, tab, _ = line.partition("\t")
        if not tab or not wnid:
            raise ValueError(f"{path}:{n}: expected '<wnid><TAB><words>', got {line!r}")
        synsets.add(wnid)
    return synsets


def read_is_a(path: Path, synsets: set[str]) -> Graph:
    """Children of each synset from wordnet.is_a.txt ("<parent> <child>" per line)."""
    children: Graph = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}:{n}: expected '<parent wnid> <child wnid>', got {line!r}")
        unknown = [wnid for wnid in pair if wnid not in synsets]
        if unknown:
            raise ValueError(f"{path}:{n}: synset {unknown[0]} is not in words.txt")
        children.setdefault(pair[0], set()).add(pair[1])
    return children


def _check_folders(root: Path, folders: dict[str, Path], synsets: set[str]) -> None:
    if not folders:
        raise layout_error(SOURCE, LAYOUT, f"no class folders in {root} (extract each "
                           "n????????.tar into a folder of the same name)")
    unknown = sorted(set(folders) - synsets)
    if unknown:
        raise layout_error(SOURCE, LAYOUT, f"folders that are not WordNet synsets of words.txt "
                           f"in {root}: {unknown[:10]}")


@dataclass
class SplitGraphs:
    """Class ids per split and each split's collapsed subgraph (children of each node)."""

    classes: dict[str, list[str]]
    graphs: dict[str, Graph]

    def internal(self, split: str) -> list[str]:
        return sorted(n for n, children in self.graphs[split].items() if children)

    def hierarchy(self) -> Hierarchy:
        nodes = [n for split in SPLITS for n in self.internal(split)]
        node_id = {n: i for i, n in enumerate(nodes)}
        class_id = {c: i for i, c in enumerate(c for s in SPLITS for c in self.classes[s])}
        edges = [(node_id[p], node_id[c] if c in node_id else -class_id[c] - 1)
                 for split in SPLITS for p in self.internal(split)
                 for c in sorted(self.graphs[split][p])]
        return Hierarchy("dag", tuple(nodes), edges=np.array(edges, np.int64).reshape(-1, 2))


def split_graphs(wordnet: Graph, leaves: list[str]) -> SplitGraphs:
    """Meta-Dataset's class split and per-split sampling graphs for the class synsets ``leaves``."""
    full = sampling_graph(wordnet, leaves)
    not_leaves = [c for c in leaves if full[c]]
    if not_leaves:
        raise ValueError(f"{SOURCE}: class synset {not_leaves[0]} is an ancestor of other "
                         "class synsets; every class must be a leaf of the WordNet graph")
    under = {split: descendants(wordnet, root) for split, root in ROOTS.items()}
    both = sorted(set(leaves) & under["valid"] & under["test"])
    if both:
        raise ValueError(f"{SOURCE}: classes {both[:5]} lie under both {ROOTS['valid']} and "
                         f"{ROOTS['test']}")
    classes = {split: [c for c in leaves if c in under[split]] for split in ROOTS}
    classes["train"] = [c for c in leaves if c not in under["valid"] | under["test"]]
    graphs = {split: sampling_graph(full, classes[split], under.get(split)) for split in SPLITS}
    internal = [n for g in graphs.values() for n, ch in g.items() if ch]
    if len(internal) != len(set(internal)):
        raise ValueError(f"{SOURCE}: the split subgraphs share internal nodes")
    return SplitGraphs(classes, graphs)


def sampling_graph(graph: Graph, leaves: Iterable[str], allowed: set[str] | None = None
                   ) -> Graph:
    """``leaves`` and their ancestors in ``graph`` (only those in ``allowed``, if given), with
    links to other nodes removed and single-child nodes collapsed."""
    leaves = set(leaves)
    nodes = ancestors(graph, leaves)
    if allowed is not None:
        nodes &= allowed
    nodes |= leaves
    return collapse({n: graph.get(n, set()) & nodes for n in nodes})


def collapse(graph: Graph) -> Graph:
    """Remove every node with exactly one child, attaching that child to the node's parents.

    As in Meta-Dataset, exactly the nodes with one child in the graph as given go (there,
    replacing a child by its own single child never changes a parent's number of children);
    a chain of such nodes is bridged by its last node.
    """
    single = {n for n, children in graph.items() if len(children) == 1}

    def through(node: str) -> str:
        while node in single:
            (node,) = graph[node]
        return node

    return {n: {through(c) for c in children} for n, children in graph.items()
            if n not in single}


def ancestors(graph: Graph, nodes: set[str]) -> set[str]:
    """Every node of ``graph`` from which one of ``nodes`` can be reached (``nodes`` excluded
    unless they reach each other)."""
    parents: Graph = {}
    for parent, children in graph.items():
        for child in children:
            parents.setdefault(child, set()).add(parent)
    found, frontier = set(), set(nodes)
    while frontier:
        frontier = {p for n in frontier for p in parents.get(n, ())} - found
        found |= frontier
    return found


def descendants(graph: Graph, root: str) -> set[str]:
    """``root`` and every node reachable from it."""
    found, frontier = {root}, {root}
    while frontier:
        frontier = {c for n in frontier for c in graph.get(n, ())} - found
        found |= frontier
    return found
