"""The jobs' command line: python -m amt COMMAND [--spec JSON] [options].

Each command lives in the module of its subject, which exposes ``register(subparsers)``. Only
the module of the command being run is imported: a job pays for what it uses (drawing episodes
needs no torch), so the rules call small, unit-tested functions that start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from amt.errors import UserError

COMMANDS = {  # command -> (its module, one line of help)
    "episodes": ("amt.episode_files", "draw and store the episodes of a domain"),
    "pretrain": ("amt.pretrain", "supervised pretraining of the built-in backbone"),
    "train": ("amt.train", "meta-tune a backbone (pm, lora, amt or styleadv)"),
    "pool": ("amt.pool", "assemble meta-tuned adapters into one LoRA pool"),
    "import-release": ("amt.release", "convert the authors' released AMT checkpoint into a pool"),
    "select": ("amt.select", "per-domain hyperparameter grid search on validation episodes"),
    "evaluate": ("amt.evaluate", "clean, adversarial and corruption accuracy of one job"),
    "report": ("amt.report", "tables and figures from the tidy results"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and ``command``'s options (all of them if None)."""
    parser = argparse.ArgumentParser(prog="python -m amt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, text) in COMMANDS.items():
        if command in (None, name):
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (``UserError``: a bad file, key or value) prints its message
    alone and exits 2, like argparse's own usage errors, with no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        device = getattr(args, "device", None) or _spec_value(args, "device")
        if device:  # before any data is read: a job without its GPU stops at once
            from amt.devices import pick_device

            pick_device(device)
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _spec_value(args: argparse.Namespace, key: str) -> object:
    """``key`` of the command's ``--spec`` JSON, if it has one (malformed JSON is the command's
    to report)."""
    try:
        spec = json.loads(getattr(args, "spec", "") or "{}")
    except json.JSONDecodeError:
        return None
    return spec.get(key) if isinstance(spec, dict) else None


if __name__ == "__main__":
    sys.exit(main())
