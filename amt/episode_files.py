"""The stored episode file, and the command that draws one.

Episode file (``save_episodes``/``load_episodes``), JSON, one episode per line::

    {"format": "amt-episodes", "format_version": 1,
     "meta": {"domain", "split", "setting", "seed", "count",
              "num_images", "num_classes", "class_sizes_crc32", ...},
     "episodes": [
      {"classes": [c0, c1, ...], "support": [[images of c0], ...], "query": [[images of c0], ...]},
      ...]}

Label k is ``classes[k]``; image indices are global indices into the domain store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from amt.episodes import Episode, Sampler, draw_episodes, sampler_from_setting
from amt.errors import UserError
from amt.registry import EPISODE_KINDS
from data_prep.store import DomainStore

EPISODE_FORMAT = "amt-episodes"
EPISODE_FORMAT_VERSION = 1
REQUIRED_META = ("domain", "split", "setting", "seed", "count",
                 "num_images", "num_classes", "class_sizes_crc32")
_FINGERPRINT = ("num_images", "num_classes", "class_sizes_crc32")


class EpisodeFileError(UserError):
    """An episode file is missing, malformed, or does not belong to the store it is used with."""


def store_fingerprint(store: DomainStore) -> dict:
    """Counts and a CRC of the class sizes: enough to notice a re-converted store."""
    sizes = np.ascontiguousarray(store.class_sizes, dtype="<i8")
    return {"num_images": store.num_images, "num_classes": store.num_classes,
            "class_sizes_crc32": zlib.crc32(sizes.tobytes())}


def episode_meta(store: DomainStore, *, domain: str, split: str, sampler: Sampler, seed: int,
                 count: int) -> dict:
    """The meta block of an episode file drawn with these arguments."""
    return {"domain": domain, "split": split, "setting": sampler.setting(), "seed": seed,
            "count": count, **store_fingerprint(store)}


def check_episodes_match(store: DomainStore, meta: dict) -> None:
    """Raise if an episode file's meta was drawn from a store other than ``store``."""
    current = store_fingerprint(store)
    differing = {k: (meta.get(k), current[k]) for k in _FINGERPRINT if meta.get(k) != current[k]}
    if differing:
        details = ", ".join(f"{k} {old} vs {new}" for k, (old, new) in differing.items())
        raise EpisodeFileError(f"episodes of {meta.get('domain')!r} were drawn from another "
                               f"version of {store.path} ({details}); draw them again")


def check_episodes_fit(store: DomainStore, episodes: list[Episode], meta: dict, path: Path,
                       setting_name: str | None = None) -> None:
    """Raise unless every episode's classes are classes of the recorded split of ``store`` and
    each image belongs to its label's class, and (given ``setting_name``) the file was drawn
    for that setting."""
    recorded = meta.get("setting_name")
    if setting_name is not None and recorded != setting_name:
        raise EpisodeFileError(f"{path}: drawn for setting {recorded!r} ({meta['setting']}), "
                               f"but the job is for setting {setting_name!r}")
    split = meta["split"]
    allowed = set(store.classes_in_split(split).tolist())
    for i, episode in enumerate(episodes):
        outside = [int(c) for c in episode.classes if int(c) not in allowed]
        if outside:
            raise EpisodeFileError(f"{path}: episode {i}: class {outside[0]} is not a class of "
                                   f"the {split!r} split of {store.path}")
        for part in ("support", "query"):
            for c, images in zip(episode.classes, episode.groups(part), strict=True):
                start = int(store.class_offsets[c])
                stray = images[(images < start) | (images >= start + store.class_sizes[c])]
                if len(stray):
                    raise EpisodeFileError(
                        f"{path}: episode {i}: {part} image {int(stray[0])} is listed under "
                        f"class {int(c)}, whose images are {start}..."
                        f"{start + int(store.class_sizes[c]) - 1} in {store.path}")


def save_episodes(path: str | os.PathLike, episodes: list[Episode], meta: dict) -> None:
    """Write the episode file atomically (temp file + rename)."""
    path = Path(path)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: meta lacks {missing}")
    if meta["count"] != len(episodes):
        raise ValueError(f"{path}: meta count {meta['count']} but {len(episodes)} episodes")
    lines = [json.dumps({"classes": e.classes.tolist(),
                         "support": [g.tolist() for g in e.groups("support")],
                         "query": [g.tolist() for g in e.groups("query")]},
                        separators=(",", ":")) for e in episodes]
    head = json.dumps({"format": EPISODE_FORMAT, "format_version": EPISODE_FORMAT_VERSION,
                       "meta": meta}, indent=1, sort_keys=True)
    text = head[:-2] + ',\n "episodes": [\n' + ",\n".join(lines) + "\n]}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def load_episodes(path: str | os.PathLike) -> tuple[list[Episode], dict]:
    """Read and validate an episode file; every problem raises EpisodeFileError naming it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EpisodeFileError(f"{path}: not a readable JSON episode file: {err}") from err
    meta = _checked_header(path, document)
    episodes = []
    for i, record in enumerate(document["episodes"]):
        try:
            episodes.append(_episode_from_record(record))
        except ValueError as err:
            raise EpisodeFileError(f"{path}: episode {i}: {err}") from err
    return episodes, meta


def _checked_header(path: Path, document: object) -> dict:
    if not isinstance(document, dict) or document.get("format") != EPISODE_FORMAT:
        raise EpisodeFileError(f"{path}: not an {EPISODE_FORMAT!r} file")
    if document.get("format_version") != EPISODE_FORMAT_VERSION:
        raise EpisodeFileError(f"{path}: format version {document.get('format_version')!r}, "
                               f"expected {EPISODE_FORMAT_VERSION}; draw the episodes again")
    meta, episodes = document.get("meta"), document.get("episodes")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise EpisodeFileError(f"{path}: meta must be a mapping with keys {REQUIRED_META}")
    if not isinstance(episodes, list) or meta["count"] != len(episodes):
        raise EpisodeFileError(f"{path}: meta count {meta['count']!r} but "
                               f"{len(episodes) if isinstance(episodes, list) else 'no'} episodes")
    return meta


def _episode_from_record(record: object) -> Episode:
    if not isinstance(record, dict) or set(record) != {"classes", "support", "query"}:
        raise ValueError("expected an object with exactly 'classes', 'support', 'query'")
    classes = _int_list(record["classes"], "classes")
    groups = {}
    for part in ("support", "query"):
        value = record[part]
        if not isinstance(value, list):
            raise ValueError(f"{part}: expected a list of per-class lists")
        groups[part] = [_int_list(g, part) for g in value]
    return Episode.from_groups(classes, groups["support"], groups["query"])


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not value or \
            not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{what}: expected a non-empty list of non-negative ints, got "
                         f"{str(value)[:60]}")
    return value


# -- the command ----------------------------------------------------------------------------------
def episode_split(store: DomainStore, sampler: Sampler, kind: str) -> str:
    """Test episodes come from the test split. Validation episodes (hyperparameter selection)
    come from the valid split when it can hold the setting, else from the test split (the
    out-of-domain targets have only test classes), drawn with a different seed. A training
    run's validation episodes come from the valid split only (the release's VALID split):
    choosing the kept epoch on test classes would leak them into the model."""
    if kind == "test":
        return "test"
    if kind == "train_valid":
        return "valid"
    try:
        sampler.check(store, "valid")
    except ValueError:
        return "test"
    return "valid"


def cmd_episodes(args: argparse.Namespace) -> int:
    """Draw the stored episodes of one (domain, kind, setting)."""
    from amt.specs import EpisodesConfig, spec_from_args

    config = spec_from_args(EpisodesConfig, args)
    store = DomainStore(config.store)
    sampler = sampler_from_setting(config.setting)
    split = episode_split(store, sampler, config.kind)
    try:
        episodes = draw_episodes(store, split, sampler, config.count, config.seed)
    except ValueError as err:  # the split cannot hold the setting: the sampler names both
        hint = " (train.validation.domains: domains whose valid split holds the training " \
            "setting)" if config.kind == "train_valid" else ""
        raise UserError(f"{config.domain} {config.kind} episodes: {err}{hint}") from None
    meta = episode_meta(store, domain=config.domain, split=split, sampler=sampler,
                        seed=config.seed, count=config.count)
    meta.update(kind=config.kind, setting_name=config.setting_name)
    save_episodes(config.out, episodes, meta)
    logging.info("%s %s %s: %d episodes from the %s split -> %s", config.domain, config.kind,
                 config.setting_name, len(episodes), split, config.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``episodes`` command."""
    from amt.specs import EpisodesConfig, add_spec_argument

    p = subparsers.add_parser("episodes", help="draw and store the episodes of a domain")
    add_spec_argument(p, EpisodesConfig)
    p.add_argument("--store", type=Path)
    p.add_argument("--domain")
    p.add_argument("--kind", choices=EPISODE_KINDS)
    p.add_argument("--setting-name")
    p.add_argument("--setting", type=json.loads, help='JSON, e.g. {"ways": 5, "shots": 1, '
                   '"queries": 15}')
    p.add_argument("--count", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_episodes)
