"""Plantae (iNaturalist 2017) in the fine-grained benchmark of Tseng et al. 2020.

Tseng's write_plantae_filelist.py takes the 200 species folders with the most files, in the
ascending-count order of ``np.argsort``, and up to 600 files of each after an unseeded shuffle of
an unsorted listing: not reproducible. Here the selection is deterministic:

- rank species by image count, most first, ties by name; keep the first ``NUM_SPECIES``;
- order the kept species by ascending image count, ties by name (Tseng's argsort order, so the
  i % 4 split falls as in his lists: base = even i, valid = i % 4 == 1, novel = i % 4 == 3);
- keep each species' first ``MAX_IMAGES`` image files by sorted name.

The resulting lists are written once to ``<out>.plantae_lists.json`` (paths relative to the
Plantae folder). A later run reuses them instead of selecting again, so a changed raw tree cannot
silently change the benchmark; a listed file that is gone is an error. Delete the lists file to
select afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from data_prep.convert import ConversionReport, StorageSettings, merged, warning, write_domain
from data_prep.sources.common import LayoutError, load_image, require_raw
from data_prep.sources.cross_domain_common import (
    Expected,
    FolderTree,
    check_expected,
    first_existing,
    scan_class_folders,
    tseng_protocol,
    unused_record,
)

log = logging.getLogger(__name__)

VERSION = "1"
NEEDS_RAW = True
# the official iNat2017 archive, or the Plantae folder alone (Tseng's plantae.tar.gz)
ROOT_CANDIDATES = ("train_val_images/Plantae", "Plantae")
LAYOUT = ("<raw>/train_val_images/Plantae/<species folder, e.g. 'Acer rubrum'>/*.jpg\n"
          "(or <raw>/Plantae/<species folder>/*.jpg)")
NUM_SPECIES = 200
MAX_IMAGES = 600
EXPECTED = Expected(classes=200, images=None, splits=(100, 50, 50))
LISTS_FORMAT = "amt-plantae-lists"
LISTS_VERSION = 1

Selection = list[tuple[str, list[Path]]]


def lists_path(out: Path) -> Path:
    return out.with_name(out.name + ".plantae_lists.json")


def select_species(tree: FolderTree, num_species: int, max_images: int) -> Selection:
    """The benchmark's species in class-index order, each with its files (see module doc)."""
    candidates = [(name, files) for name, files in tree.classes if files]
    ranked = sorted(candidates, key=lambda c: (-len(c[1]), c[0]))[:num_species]
    ordered = sorted(ranked, key=lambda c: (len(c[1]), c[0]))
    return [(name, files[:max_images]) for name, files in ordered]


def empty_record(root: Path, tree: FolderTree) -> dict:
    """Species folders without an image file: never selected, and named in the report."""
    empty = [str(root / name) for name, files in tree.classes if not files]
    if not empty:
        return {"empty_species_folders": 0}
    return merged({"empty_species_folders": len(empty)},
                  warning("plantae", f"{len(empty)} species folders hold no image file and "
                                     f"cannot be selected: {empty[:10]}"))


def write_lists(path: Path, root: Path, selection: Selection) -> None:
    classes = [{"name": name, "files": [f.relative_to(root).as_posix() for f in files]}
               for name, files in selection]
    document = {"format": LISTS_FORMAT, "version": LISTS_VERSION,
                "rule": f"top {NUM_SPECIES} species by image count (ties by name), ordered by "
                        f"ascending count (ties by name); first {MAX_IMAGES} files by name",
                "classes": classes}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def read_lists(path: Path, root: Path) -> Selection:
    """The stored selection; every listed file must still exist under ``root``."""
    try:
        document = json.loads(path.read_text())
        if document["format"] != LISTS_FORMAT or document["version"] != LISTS_VERSION:
            raise ValueError(f"format {document['format']!r} version {document['version']!r}")
        selection = [(c["name"], [root / f for f in c["files"]]) for c in document["classes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a {LISTS_FORMAT} v{LISTS_VERSION} file ({err!r}); delete "
                         "it to select the species again") from err
    missing = [str(f) for _, files in selection for f in files if not f.is_file()]
    if missing:
        raise LayoutError(f"plantae: {len(missing)} files listed in {path} are missing, e.g. "
                          f"{missing[:5]}; restore them, or delete the lists file to select again "
                          "(which changes the benchmark)")
    return selection


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    out = Path(out)
    root = first_existing(require_raw(raw, "plantae", LAYOUT), ROOT_CANDIDATES, "plantae", LAYOUT)
    lists = lists_path(out)
    tree = scan_class_folders(root)  # also when the lists exist: what is unused is reported
    extra = merged(unused_record("plantae", tree.unused), empty_record(root, tree))
    if lists.exists():
        log.info("plantae: reusing the species and file lists in %s", lists)
        selection = read_lists(lists, root)
    else:
        selection = select_species(tree, NUM_SPECIES, MAX_IMAGES)
        write_lists(lists, root, selection)
        log.info("plantae: wrote the species and file lists to %s", lists)
    classes, protocol = tseng_protocol(selection)
    extra = merged(extra, protocol,
                   check_expected("plantae", classes, EXPECTED, full=len(selection) >= NUM_SPECIES),
                   {"lists_file": lists.name,
                    "lists_sha256": hashlib.sha256(lists.read_bytes()).hexdigest()})
    return write_domain(out, source="plantae", converter_version=VERSION, classes=classes,
                        load=load_image, settings=settings, extra_settings=extra, workers=workers)
