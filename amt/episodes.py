"""Few-shot episodes and their samplers (numpy only; the stored episode file is
``amt.episode_files``, the Datasets that load episodes' pixels ``amt.episode_data``).

An ``Episode`` names store class ids and image indices only; pixels are read and transformed when
a Dataset item is requested. All randomness comes from ``episode_rng(seed, *keys)``: episode i of
a draw uses ``episode_rng(seed, i)`` and image p of its item ``episode_rng(seed, i, p)``, so results
do not depend on process, worker count or order of access.

Samplers:
- ``FixedSampler``: N-way K-shot with Q queries per class (BSCD-FSL, fine-grained, meta-training).
- ``VariableSampler``: Meta-Dataset's variable-way variable-shot episodes (google-research/
  meta-dataset, ``data/sampling.py``, ``EpisodeDescriptionSampler`` with the gin defaults), using
  the store's hierarchy like Meta-Dataset does for Omniglot (two_level) and ImageNet (dag).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, fields

import numpy as np

from data_prep.store import DomainStore, Hierarchy


# -- determinism ----------------------------------------------------------------------------------
def _entropy(key: object) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
        return int(key)
    raise ValueError(f"random key {key!r}: expected a non-negative int or a str")


def episode_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """The generator for ``(seed, *keys)``; strings enter as their CRC-32."""
    return np.random.default_rng(np.random.SeedSequence([_entropy(k) for k in (seed, *keys)]))


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


# -- episodes -------------------------------------------------------------------------------------
def _index_array(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or np.any(array < 0):
        raise ValueError(f"episode {name}: expected a 1-D array of non-negative ints, "
                         f"got dtype {array.dtype} and shape {array.shape}")
    array = array.astype(np.int64)
    array.setflags(write=False)
    return array


def _check_grouped(name: str, labels: np.ndarray, ways: int) -> None:
    if len(labels) == 0 or np.any(np.diff(labels) < 0) or labels[0] != 0 \
            or labels[-1] != ways - 1 or len(np.unique(labels)) != ways:
        raise ValueError(f"episode {name}: expected labels grouped as 0..{ways - 1} in "
                         "non-decreasing order, every label present")


@dataclass(frozen=True, eq=False)
class Episode:
    """One few-shot task: ``classes[k]`` is the store class of label k.

    Support and query are grouped by label (all of label 0 first); the stored format and
    prototype code rely on it. No image appears twice in the episode.
    """

    classes: np.ndarray
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _index_array(f.name, getattr(self, f.name)))
        ways = len(self.classes)
        if ways == 0 or len(np.unique(self.classes)) != ways:
            raise ValueError(f"episode classes {self.classes.tolist()}: expected distinct ids")
        for part in ("support", "query"):
            images, labels = getattr(self, part), getattr(self, f"{part}_labels")
            if len(images) != len(labels):
                raise ValueError(f"episode {part}: {len(images)} images but {len(labels)} labels")
            _check_grouped(f"{part}_labels", labels, ways)
        every = np.concatenate([self.support, self.query])
        if len(np.unique(every)) != len(every):
            raise ValueError("episode: an image appears twice (within or across support/query)")

    @classmethod
    def from_groups(cls, classes, support_groups, query_groups) -> Episode:
        """Build from per-class lists of image indices (group k belongs to ``classes[k]``)."""
        if not len(support_groups) == len(query_groups) == len(classes):
            raise ValueError(f"episode: {len(classes)} classes but {len(support_groups)} support "
                             f"and {len(query_groups)} query groups")

        def flat(groups) -> tuple[np.ndarray, np.ndarray]:
            sizes = [len(g) for g in groups]
            images = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
            return images, np.repeat(np.arange(len(groups)), sizes)

        return cls(np.asarray(classes), *flat(support_groups), *flat(query_groups))

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> np.ndarray:
        """Support images per label."""
        return np.bincount(self.support_labels, minlength=self.ways)

    @property
    def queries(self) -> np.ndarray:
        """Query images per label."""
        return np.bincount(self.query_labels, minlength=self.ways)

    def groups(self, part: str) -> list[np.ndarray]:
        """Image indices of ``part`` ('support' or 'query') split per label."""
        images, counts = getattr(self, part), getattr(self, {"support": "shots",
                                                              "query": "queries"}[part])
        return np.split(images, np.cumsum(counts)[:-1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name))
                   for f in fields(self))


def _pick_images(store: DomainStore, classes: np.ndarray, shots: np.ndarray,
                 queries: np.ndarray, rng: np.random.Generator) -> Episode:
    """Per class, ``shots + queries`` distinct images: the first ``shots`` form the support."""
    support, query = [], []
    for c, s, q in zip(classes, shots, queries, strict=True):
        chosen = store.class_offsets[c] + rng.choice(store.class_sizes[c], s + q, replace=False)
        support.append(chosen[:s])
        query.append(chosen[s:])
    return Episode.from_groups(classes, support, query)


# -- samplers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedSampler:
    """N-way K-shot, Q queries per class; classes and images uniform without replacement."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(f.name, getattr(self, f.name), 1)

    def setting(self) -> dict:
        return {"ways": self.ways, "shots": self.shots, "queries": self.queries}

    def check(self, store: DomainStore, split: str) -> np.ndarray:
        """The classes of ``split`` with enough images; raises if fewer than ``ways``."""
        split_classes = store.classes_in_split(split)
        need = self.shots + self.queries
        eligible = split_classes[store.class_sizes[split_classes] >= need]
        if len(eligible) < self.ways:
            raise ValueError(
                f"{store.path}: split {split!r} has {len(eligible)} classes with at least "
                f"{need} images ({self.shots} shots + {self.queries} queries) out of "
                f"{len(split_classes)}, fewer than ways={self.ways}")
        return eligible

    def sample(self, store: DomainStore, split: str, rng: np.random.Generator) -> Episode:
        classes = rng.choice(self.check(store, split), self.ways, replace=False)
        counts = np.full(self.ways, self.shots), np.full(self.ways, self.queries)
        return _pick_images(store, classes, *counts, rng)


@dataclass(frozen=True)
class VariableSampler:
    """Meta-Dataset's variable-way variable-shot sampler (defaults: its gin configuration).

    Classes with fewer than 2 images (``num_support`` + 1 with a fixed support) are never used
    (Meta-Dataset raises when one is drawn, since a class needs one support and one query
    image). With ``use_hierarchy`` a two_level store draws a superclass first, a dag store an
    internal node (see ``_groups``). ``num_support`` fixes the support images per class with the
    ways still variable (Meta-Dataset's num_support; queries then min(max_queries, the smallest
    class - num_support)).
    """

    min_ways: int = 5
    max_ways: int = 50
    max_support: int = 500
    max_support_per_class: int = 100  # cap on a class's contribution to the support *size*
    max_queries: int = 10
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    max_spanning_leaves: int = 392  # Meta-Dataset's MAX_SPANNING_LEAVES_ELIGIBLE
    use_hierarchy: bool = True
    num_support: int | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int("min_ways", self.min_ways, 1)
        check_int("max_ways", self.max_ways, self.min_ways)
        check_int("max_support", self.max_support, self.max_ways)
        check_int("max_support_per_class", self.max_support_per_class, 1)
        check_int("max_queries", self.max_queries, 1)
        check_int("max_spanning_leaves", self.max_spanning_leaves, self.min_ways)
        if self.num_support is not None:
            check_int("num_support", self.num_support, 1)
        weights = (self.min_log_weight, self.max_log_weight)
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights) \
                or weights[0] > weights[1]:
            raise ValueError(f"log weights {weights}: expected finite min <= max")
        if not isinstance(self.use_hierarchy, bool):
            raise ValueError(f"use_hierarchy={self.use_hierarchy!r}: expected true or false")

    def setting(self) -> dict:
        return {"variable": True, **{f.name: getattr(self, f.name) for f in fields(self)
                                     if f.init}}

    def check(self, store: DomainStore, split: str) -> tuple[str, list[np.ndarray]]:
        """Candidate class groups of ``split`` (cached); raises if no episode can be made."""
        key = (str(store.path), store.num_images, split)
        if key not in self._cache:
            self._cache[key] = self._groups(store, split)
        return self._cache[key]

    def _groups(self, store: DomainStore, split: str) -> tuple[str, list[np.ndarray]]:
        split_classes = store.classes_in_split(split)
        eligible = split_classes[store.class_sizes[split_classes] >= self._min_images]
        hierarchy = store.hierarchy if self.use_hierarchy else None
        if hierarchy is None:
            kind, groups = "flat", [eligible] if len(eligible) >= self.min_ways else []
        elif hierarchy.kind == "two_level":
            kind, groups = "two_level", _superclass_groups(hierarchy, eligible, self.min_ways)
        else:
            kind, groups = "dag", _dag_groups(hierarchy, split_classes, eligible, self.min_ways,
                                              self.max_spanning_leaves)
        if not groups:
            raise ValueError(
                f"{store.path}: split {split!r} cannot give a {kind} variable-way episode: "
                f"{len(eligible)} of {len(split_classes)} classes have at least "
                f"{self._min_images} images and no "
                f"{'group' if kind == 'flat' else 'superclass/node'} has min_ways={self.min_ways}")
        return kind, groups

    @property
    def _min_images(self) -> int:
        return 2 if self.num_support is None else self.num_support + 1

    def sample(self, store: DomainStore, split: str, rng: np.random.Generator) -> Episode:
        classes = self._sample_classes(*self.check(store, split), rng)
        sizes = store.class_sizes[classes]
        if self.num_support is not None:
            queries = min(self.max_queries, int(sizes.min()) - self.num_support)
            shots = np.full(len(classes), self.num_support)
        else:
            queries = min(self.max_queries, int((sizes // 2).min()))
            remaining = sizes - queries
            support_size = self._support_size(remaining, rng)
            shots = self._shots(sizes, remaining, support_size, rng)
        return _pick_images(store, classes, shots, np.full(len(classes), queries), rng)

    def _sample_classes(self, kind: str, groups: list[np.ndarray], rng: np.random.Generator
                        ) -> np.ndarray:
        # As Meta-Dataset: no group draw without a hierarchy; a dag node fixes the ways itself.
        group = groups[0] if kind == "flat" else groups[rng.integers(len(groups))]
        if kind == "dag":
            if len(group) <= self.max_ways:
                return group
            return rng.choice(group, self.max_ways, replace=False)
        ways = rng.integers(self.min_ways, min(self.max_ways, len(group)) + 1)
        return rng.choice(group, ways, replace=False)

    def _support_size(self, remaining: np.ndarray, rng: np.random.Generator) -> int:
        # floor(beta * contribution) + 1 per class: at least one support image per class.
        beta = rng.uniform()
        contributions = np.minimum(self.max_support_per_class, remaining)
        return int(min(np.floor(beta * contributions + 1).sum(), self.max_support))

    def _shots(self, sizes: np.ndarray, remaining: np.ndarray, support_size: int,
               rng: np.random.Generator) -> np.ndarray:
        weights = sizes * np.exp(rng.uniform(self.min_log_weight, self.max_log_weight,
                                             size=len(sizes)))
        shares = weights / weights.sum()
        shots = np.floor(shares * (support_size - len(sizes))).astype(np.int64) + 1
        return np.minimum(shots, remaining)


Sampler = FixedSampler | VariableSampler


def _superclass_groups(hierarchy: Hierarchy, eligible: np.ndarray, min_ways: int
                       ) -> list[np.ndarray]:
    """Eligible classes of each superclass; superclasses with fewer than ``min_ways`` are left
    out (Meta-Dataset raises on them instead: its Omniglot splits never have one)."""
    parents = hierarchy.class_parent[eligible]
    groups = [eligible[parents == s] for s in np.unique(parents)]
    return [g for g in groups if len(g) >= min_ways]


def _dag_groups(hierarchy: Hierarchy, split_classes: np.ndarray, eligible: np.ndarray,
                min_ways: int, max_leaves: int) -> list[np.ndarray]:
    """Leaves (eligible classes) of each internal node of the split's subgraph, for the nodes
    spanning between ``min_ways`` and ``max_leaves`` of them.

    Meta-Dataset's split subgraph holds the split's classes and their ancestors with every
    single-child node collapsed; so here a node is internal when at least two of its children
    reach a class of the split. Nodes come in id order (Meta-Dataset: WordNet id order).
    """
    child_nodes, child_classes = _children(hierarchy)
    in_split = set(split_classes.tolist())
    spans: list[frozenset[int]] = [frozenset()] * len(hierarchy.node_names)
    internal = np.zeros(len(spans), dtype=bool)
    for node in _children_first(child_nodes):
        parts = [spans[c] for c in child_nodes[node] if spans[c]]
        parts += [frozenset([c]) for c in child_classes[node] if c in in_split]
        spans[node] = frozenset().union(*parts)
        internal[node] = len(parts) >= 2
    keep = set(eligible.tolist())
    groups = [np.array(sorted(spans[n] & keep), dtype=np.int64) for n in np.flatnonzero(internal)]
    return [g for g in groups if min_ways <= len(g) <= max_leaves]


def _children(hierarchy: Hierarchy) -> tuple[list[set[int]], list[set[int]]]:
    n = len(hierarchy.node_names)
    nodes: list[set[int]] = [set() for _ in range(n)]
    classes: list[set[int]] = [set() for _ in range(n)]
    for parent, child in np.asarray(hierarchy.edges).tolist():
        if not 0 <= parent < n or child >= n:
            raise ValueError(f"hierarchy edge ({parent}, {child}) names a node outside [0, {n})")
        if child >= 0:
            nodes[parent].add(child)
        else:
            classes[parent].add(-child - 1)
    return nodes, classes


def _children_first(child_nodes: list[set[int]]) -> list[int]:
    """Nodes ordered so every node comes after its children; raises on a cycle."""
    state = [0] * len(child_nodes)  # 0 new, 1 on the stack, 2 done
    order: list[int] = []
    for root in range(len(child_nodes)):
        stack = [(root, iter(sorted(child_nodes[root])))] if state[root] == 0 else []
        state[root] = max(state[root], 1)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state[child] == 1:
                raise ValueError(f"hierarchy has a cycle through node {child}")
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(sorted(child_nodes[child]))))
    return order


_VARIABLE_KEYS = tuple(f.name for f in fields(VariableSampler) if f.init)
_FIXED_KEYS = ("ways", "shots", "queries")


def sampler_from_setting(setting: dict) -> Sampler:
    """``{"ways", "shots", "queries"}`` -> FixedSampler; ``{"variable": true, overrides}`` ->
    VariableSampler (overrides: any of its constructor arguments)."""
    if not isinstance(setting, dict):
        raise ValueError(f"episode setting {setting!r}: expected a mapping")
    variable = setting.get("variable", False)
    if not isinstance(variable, bool):
        raise ValueError(f"episode setting variable={variable!r}: expected true or false")
    allowed = ("variable", *(_VARIABLE_KEYS if variable else _FIXED_KEYS))
    unknown = [k for k in setting if k not in allowed]
    if unknown:
        raise ValueError(f"episode setting key {unknown[0]!r} is not allowed "
                         f"{'with' if variable else 'without'} variable=true; allowed: {allowed}")
    arguments = {k: v for k, v in setting.items() if k != "variable"}
    if variable:
        return VariableSampler(**arguments)
    missing = [k for k in _FIXED_KEYS if k not in setting]
    if missing:
        raise ValueError(f"episode setting {setting}: missing {missing} for a fixed setting")
    return FixedSampler(**arguments)



def draw_episodes(store: DomainStore, split: str, sampler: Sampler, count: int, seed: int
                  ) -> list[Episode]:
    """``count`` episodes; episode i is drawn with ``episode_rng(seed, i)``."""
    check_int("count", count, 0)
    sampler.check(store, split)
    return [sampler.sample(store, split, episode_rng(seed, i)) for i in range(count)]
