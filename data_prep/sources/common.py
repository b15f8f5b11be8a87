"""Helpers shared by the raw-source modules: layout checks, file listing, image loading."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff",
                            ".webp"})


class LayoutError(FileNotFoundError):
    """The raw root does not look like the source's documented download."""


def require(path: Path, source: str, layout: str) -> Path:
    """Return ``path`` if it exists, else fail with the layout the source expects."""
    if not path.exists():
        raise LayoutError(f"{source}: expected {path} but it does not exist.\n"
                          f"Expected raw layout for {source}:\n{layout}")
    return path


def require_raw(raw: Path | None, source: str, layout: str) -> Path:
    if raw is None:
        raise LayoutError(f"{source}: needs --raw pointing at the unpacked download.\n"
                          f"Expected raw layout for {source}:\n{layout}")
    return require(Path(raw), source, layout)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in sorted filename order (Meta-Dataset's order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` in sorted name order."""
    return sorted(p for p in root.iterdir() if p.is_dir())


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so truncated files fail here, inside the worker)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def load_crop(item: tuple[str, Sequence[float]]) -> Image.Image:
    """Load ``(path, (left, top, right, bottom))`` and crop to the box, clipped to the image."""
    path, box = item
    image = load_image(path)
    left, top, right, bottom = box
    clipped = (max(0, int(left)), max(0, int(top)), min(image.width, int(right)),
               min(image.height, int(bottom)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ValueError(f"empty crop {box} in image of size {image.size}")
    return image.crop(clipped)
