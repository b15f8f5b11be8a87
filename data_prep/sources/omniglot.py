"""Omniglot (Meta-Dataset source ``omniglot``): 1,623 characters of 50 alphabets, two-level.

Class = "<alphabet>-<character>", superclass = alphabet. Splits follow Meta-Dataset (Lake's
background/evaluation split, with a validation set carved out of background):
- valid: the 5 background alphabets with the fewest characters, in Meta-Dataset's order;
- train: the other 25 background alphabets, sorted;
- test: the 20 evaluation alphabets, sorted.
Characters sorted within an alphabet, files sorted within a character. Images are inverted
(white strokes on black), as Meta-Dataset stores them; kept greyscale at their native 105 px.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from data_prep.convert import ClassSpec, ConversionReport, StorageSettings
from data_prep.sources.common import class_folders, load_image, require
from data_prep.sources.metadataset_common import class_files, find_root, write_metadataset

SOURCE = "omniglot"
VERSION = "1"
NEEDS_RAW = True
LAYOUT = """\
omniglot/                                        <- --raw
  images_background/<alphabet>/<character>/*.png  images_background.zip, unpacked (30 alphabets)
  images_evaluation/<alphabet>/<character>/*.png  images_evaluation.zip, unpacked (20 alphabets)"""
VALID_ALPHABETS = ("Blackfoot_(Canadian_Aboriginal_Syllabics)",
                   "Ojibwe_(Canadian_Aboriginal_Syllabics)",
                   "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tagalog", "Alphabet_of_the_Magi")


def convert(raw: Path | None, out: Path, *, workers: int = 1,
            settings: StorageSettings | None = None) -> ConversionReport:
    root = find_root(raw, SOURCE, LAYOUT, "images_background", ("omniglot",))
    background = {a.name: a for a in class_folders(root / "images_background")}
    evaluation = class_folders(require(root / "images_evaluation", SOURCE, LAYOUT))
    alphabets = ([("train", background[name]) for name in sorted(background)
                  if name not in VALID_ALPHABETS]
                 + [("valid", background[name]) for name in VALID_ALPHABETS if name in background]
                 + [("test", folder) for folder in evaluation])
    classes = [ClassSpec(f"{folder.name}-{character.name}", split, class_files(character),
                         superclass=folder.name)
               for split, folder in alphabets for character in class_folders(folder)]
    return write_metadataset(
        out, source=SOURCE, version=VERSION, classes=classes, load=load_inverted,
        split_source="structure: valid = 5 smallest background alphabets, test = evaluation",
        workers=workers, settings=settings, extra={"inverted": True})


def load_inverted(path: str) -> Image.Image:
    """A stroke image as greyscale with black and white swapped."""
    return ImageOps.invert(load_image(path).convert("L"))
