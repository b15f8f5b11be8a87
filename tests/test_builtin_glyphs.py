"""The rendered glyph domain: fonts, class selection, determinism, split by script."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.builtin import glyphs
from data_prep.builtin.fonts import default_font_dir, discover_fonts, draws
from data_prep.builtin.glyphs import GlyphSettings, select_classes
from data_prep.store import DomainStore

# one script per split, few classes and instances: a whole domain in about a second
SMALL = {"instances": 3, "max_classes_per_script": 4, "scripts": ["Hebrew", "N'Ko", "Tifinagh"]}


@pytest.fixture(scope="module")
def fonts():
    return discover_fonts(default_font_dir())


@pytest.fixture(scope="module")
def small_domain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glyphs") / "glyphs.h5"
    glyphs.convert(None, out, **SMALL)
    return out


def _contents(path: Path) -> tuple[bytes, list]:
    with h5py.File(path, "r") as f:
        return f["image_bytes"][:].tobytes(), list(f["classes/names"][:])


def test_same_bytes_on_rerun_and_with_two_workers(small_domain: Path, tmp_path: Path) -> None:
    again, parallel = tmp_path / "again.h5", tmp_path / "parallel.h5"
    glyphs.convert(None, again, **SMALL)
    glyphs.convert(None, parallel, workers=2, **SMALL)
    reference = _contents(small_domain)
    assert _contents(again) == reference
    assert _contents(parallel) == reference


def test_a_different_seed_draws_different_images(small_domain: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1.h5"
    glyphs.convert(None, other, **SMALL, seed=1)
    first, second = _contents(small_domain), _contents(other)
    assert first[1] == second[1]  # the classes depend on the fonts, not on the seed
    assert first[0] != second[0]


def test_whole_scripts_per_split_and_two_level_hierarchy(small_domain: Path) -> None:
    store = DomainStore(small_domain)
    hierarchy = store.hierarchy
    assert hierarchy.kind == "two_level"
    assert hierarchy.node_names == ("Hebrew", "N'Ko", "Tifinagh")
    expected_split = {s.name: s.split for s in glyphs.SCRIPTS}
    splits_of_script: dict[str, set[str]] = {}
    for split in ("train", "valid", "test"):
        for c in store.classes_in_split(split):
            script = hierarchy.node_names[hierarchy.class_parent[c]]
            splits_of_script.setdefault(script, set()).add(split)
            assert expected_split[script] == split
    assert splits_of_script == {"Hebrew": {"train"}, "N'Ko": {"valid"}, "Tifinagh": {"test"}}
    assert store.attrs["settings"]["script_split"] == {"Hebrew": "train", "N'Ko": "valid",
                                                       "Tifinagh": "test"}


def test_every_class_has_its_instances_as_white_glyphs_on_black(small_domain: Path) -> None:
    store = DomainStore(small_domain)
    assert store.num_classes == 12
    assert list(store.class_sizes) == [3] * 12
    assert store.class_names[0].startswith("HEBREW LETTER")
    for i in range(store.num_images):
        image = store.read(i)
        assert image.shape == (64, 64, 1)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert image.max() > 200 and np.median(border) == 0
        assert 0.02 < (image > 127).mean() < 0.6  # a glyph, neither blank nor a blob
    assert store.verify() == []


def test_instances_of_a_class_differ(small_domain: Path) -> None:
    store = DomainStore(small_domain)
    for c in range(store.num_classes):
        images = [store.read(int(i)).tobytes() for i in store.images_of_class(c)]
        assert len(set(images)) == len(images)


def test_cross_script_twins_are_kept_once(fonts) -> None:
    settings = GlyphSettings(scripts=("Latin", "Greek", "Cyrillic"), max_classes_per_script=1000)
    classes, dropped = select_classes(fonts, settings)
    chars = {c.char for c in classes}
    assert "A" in chars and "\u0391" not in chars and "\u0410" not in chars  # Latin, Greek, Cyr A
    assert dropped["duplicates"]["U+0391"] == "U+0041"
    assert dropped["duplicates"]["U+0410"] == "U+0041"
    assert "\u0416" in chars  # Cyrillic Zhe has no twin
    assert "\u00c1" not in chars  # A with acute: a base letter plus a diacritic


def test_classes_need_two_fonts_that_really_draw_them(fonts) -> None:
    by_name = {f.name: f for f in fonts}
    # LastResort maps every code point to a placeholder box; the TeX fonts map ASCII to
    # delimiters and arrows (cmex10 'A' is a parenthesis piece)
    assert not draws(by_name["LastResortHE-Regular.ttf"], "A")
    assert not draws(by_name["cmex10.ttf"], "A")
    assert not by_name["LastResortHE-Regular.ttf"].mapped and not by_name["cmr10.ttf"].mapped
    assert draws(by_name["DejaVuSans.ttf"], "A")
    assert not draws(by_name["DejaVuSans.ttf"], " ")  # mapped, but no ink
    classes, _ = select_classes(fonts, GlyphSettings(scripts=("Tifinagh",)))
    for glyph_class in classes:
        assert len(glyph_class.font_ids) >= 2
        assert all(draws(fonts[i], glyph_class.char) for i in glyph_class.font_ids)


def test_thinning_keeps_an_even_spread(fonts) -> None:
    full, _ = select_classes(fonts, GlyphSettings(scripts=("Armenian",),
                                                  max_classes_per_script=1000))
    thin, dropped = select_classes(fonts, GlyphSettings(scripts=("Armenian",),
                                                        max_classes_per_script=10))
    assert len(thin) == 10 and dropped["thinned"]["Armenian"] == len(full) - 10
    assert thin[0].char == full[0].char and thin[-1].char == full[-1].char


def test_unknown_script_and_missing_fonts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown.*known"):
        glyphs.convert(None, tmp_path / "x.h5", scripts=["Klingon"])
    with pytest.raises(ValueError, match="unknown options.*known options"):
        glyphs.convert(None, tmp_path / "x.h5", instance=3)
    with pytest.raises(ValueError, match="instances=0: expected a positive integer"):
        glyphs.convert(None, tmp_path / "x.h5", instances=0)
    with pytest.raises(ValueError, match="scripts='Latin': expected a list of script names"):
        glyphs.convert(None, tmp_path / "x.h5", scripts="Latin")
    with pytest.raises(FileNotFoundError, match="no .ttf/.otf"):
        glyphs.convert(tmp_path, tmp_path / "x.h5")
    shutil.copy(default_font_dir() / "DejaVuSans.ttf", tmp_path / "DejaVuSans.ttf")
    with pytest.raises(ValueError, match="drawn by 2 or more of the fonts in"):
        glyphs.convert(tmp_path, tmp_path / "x.h5", **SMALL)
    assert not (tmp_path / "x.h5").exists()
