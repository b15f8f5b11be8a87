"""Command line: ``python -m amt {episodes,pretrain,train,...}``.

Each command lives in the module of its concept, which exposes ``register(subparsers)``; this
file only assembles them, so the rules call small, unit-tested functions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from amt.devices import pick_device
from amt.errors import UserError

COMMAND_MODULES = ("amt.train", "amt.pool", "amt.select", "amt.evaluate", "amt.report")


def cmd_episodes(args: argparse.Namespace) -> int:
    """Draw the stored episodes of one (domain, kind, setting)."""
    from amt.episodes import draw_episodes, episode_meta, sampler_from_setting, save_episodes
    from data_prep.store import DomainStore

    store = DomainStore(args.store)
    sampler = sampler_from_setting(json.loads(args.setting))
    split = episode_split(store, sampler, args.kind)
    episodes = draw_episodes(store, split, sampler, args.count, args.seed)
    meta = episode_meta(store, domain=args.domain, split=split, sampler=sampler, seed=args.seed,
                        count=args.count)
    meta.update(kind=args.kind, setting_name=args.setting_name)
    save_episodes(args.out, episodes, meta)
    logging.info("%s %s %s: %d episodes from the %s split -> %s", args.domain, args.kind,
                 args.setting_name, len(episodes), split, args.out)
    return 0


def episode_split(store, sampler, kind: str) -> str:
    """Test episodes come from the test split. Validation episodes (hyperparameter selection)
    come from the valid split when it can hold the setting, else from the test split (the
    out-of-domain targets have only test classes), drawn with a different seed."""
    if kind == "test":
        return "test"
    try:
        sampler.check(store, "valid")
    except ValueError:
        return "test"
    return "valid"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m amt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    episodes = sub.add_parser("episodes", help="draw and store the episodes of a domain")
    episodes.add_argument("--store", type=Path, required=True)
    episodes.add_argument("--domain", required=True)
    episodes.add_argument("--kind", choices=["test", "valid"], required=True)
    episodes.add_argument("--setting-name", required=True)
    episodes.add_argument("--setting", required=True, help='JSON, e.g. {"ways": 5, ...}')
    episodes.add_argument("--count", type=int, required=True)
    episodes.add_argument("--seed", type=int, required=True)
    episodes.add_argument("--out", type=Path, required=True)
    episodes.set_defaults(func=cmd_episodes)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (``UserError``: a bad file, key or value) prints its message
    alone and exits 2, like argparse's own usage errors, with no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None):  # before any data is read: a job without its GPU
            pick_device(args.device)         # stops at once
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
