"""Image transforms: HxWxC uint8 arrays in, float32 3xSxS tensors in [0, 1] pixel space out.

Normalisation is left to the models because attacks perturb [0, 1] pixels. A transform is called
as ``transform(image, rng)`` and draws randomness only from ``rng``, so an image's augmentation
is fixed by (seed, episode, position) whichever worker process runs it.

Geometry follows torchvision's semantics (``RandomResizedCrop`` with its centre-crop fallback;
``Resize(shorter side)`` + ``CenterCrop``) but crops and resizes in a single PIL call; colour
jitter is PMF's ``ImageJitter`` (PIL ImageEnhance Brightness, Contrast, Color in that order),
computed in float. Per-image pixel work runs in PIL and numpy, never in torch: a 3x128x128 torch
op is split over all intra-op threads, and when another process holds a core each such op
stalls (measured 5-20x slower in the main process); numpy ufuncs stay on one thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from amt.registry import TEST_TRANSFORMS

Transform = Callable[[np.ndarray, np.random.Generator], torch.Tensor]

# ITU-R 601 luma weights, as PIL's RGB -> L conversion (used by ImageEnhance Contrast and Color).
_LUMA = tuple(np.float32(w) for w in (0.299, 0.587, 0.114))
_RESAMPLE = Image.Resampling.BILINEAR  # torchvision's default interpolation


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return value


def to_pil(image: np.ndarray) -> Image.Image:
    """Check an HxWxC uint8 image (C 1 or 3) and wrap it as a PIL 'L' or 'RGB' image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] not in (1, 3) or 0 in image.shape:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image of shape {shape} and dtype {dtype}: expected an HxWxC uint8 "
                         "array with C = 1 or 3")
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def to_array(pil: Image.Image) -> np.ndarray:
    """PIL 'L' or 'RGB' image -> new float32 3xHxW C-contiguous array in [0, 1] (grey repeated)."""
    array = np.asarray(pil)
    chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    chw = np.broadcast_to(chw, (3, *array.shape[:2]))
    return np.divide(chw, np.float32(255.0), dtype=np.float32, order="C")


def centre_crop_box(width: int, height: int, resize: int, size: int
                    ) -> tuple[float, float, float, float]:
    """Box in source pixels equal to ``Resize(resize)`` (shorter side) then ``CenterCrop(size)``.

    Sizes and offsets are rounded as torchvision rounds them, then mapped back to the source so
    one PIL resize over the box samples exactly the pixels the two-step version would.
    """
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ten tries, then a centre crop; PIL box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _luma(x: np.ndarray) -> np.ndarray:
    # Elementwise rather than a matrix product, which could hand the work to BLAS threads.
    return _LUMA[0] * x[0] + _LUMA[1] * x[1] + _LUMA[2] * x[2]


def _blend_(x: np.ndarray, base: np.ndarray | np.float32, factor: float) -> np.ndarray:
    """In place: base + factor * (x - base), clipped to [0, 1] (PIL's Image.blend + uint8 clip)."""
    x -= base
    x *= np.float32(factor)
    x += base
    return np.clip(x, 0.0, 1.0, out=x)


def colour_jitter(x: np.ndarray, brightness: float, contrast: float, saturation: float
                  ) -> np.ndarray:
    """PIL ImageEnhance Brightness, Contrast, Color on a float 3xHxW array, in place.

    Brightness blends with black, Contrast with the mean luma of the whole image, Color with the
    per-pixel luma (the identity on a greyscale image, as in PIL); each result is clipped.
    """
    _blend_(x, np.float32(0.0), brightness)
    _blend_(x, np.float32(_luma(x).mean()), contrast)
    return _blend_(x, _luma(x)[None], saturation)


def squash_crop_box(width: int, height: int, resize: int, size: int
                    ) -> tuple[float, float, float, float]:
    """Box in source pixels equal to ``Resize((resize, resize))`` (a squash: the aspect ratio
    is not kept) then ``CenterCrop(size)``, rounded as torchvision rounds the crop."""
    offset = int(round((resize - size) / 2.0))
    sx, sy = width / resize, height / resize
    return offset * sx, offset * sy, (offset + size) * sx, (offset + size) * sy


BOXES = {"crop": centre_crop_box, "squash": squash_crop_box}  # registry.TEST_TRANSFORMS


@dataclass(frozen=True)
class EvalTransform:
    """``kind`` crop: resize the shorter side to ``resize`` (aspect kept), centre-crop
    ``image_size``; squash: resize to ``resize`` x ``resize`` (PMF's BSCD-FSL transform,
    Resize([147, 147]) at 128 px), centre-crop ``image_size``. No randomness."""

    image_size: int = 128
    resize: int = 146
    kind: str = TEST_TRANSFORMS[0]

    def __post_init__(self) -> None:
        _positive_int("image_size", self.image_size)
        _positive_int("resize", self.resize)
        if self.resize < self.image_size:
            raise ValueError(f"resize={self.resize} is smaller than image_size="
                             f"{self.image_size}: the centre crop would not fit")
        if self.kind not in BOXES:
            raise ValueError(f"test transform {self.kind!r}: expected one of {list(BOXES)}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None
                 ) -> torch.Tensor:
        pil = to_pil(image)
        box = BOXES[self.kind](pil.width, pil.height, self.resize, self.image_size)
        size = (self.image_size, self.image_size)
        return torch.from_numpy(to_array(pil.resize(size, _RESAMPLE, box=box)))


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop, PMF colour jitter, horizontal flip (PMF's meta-training pipeline)."""

    image_size: int = 128
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4  # each factor ~ U(1 - jitter, 1 + jitter), as PMF's ImageJitter
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        _positive_int("image_size", self.image_size)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale}: expected 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio}: expected 0 < low <= high")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter={self.jitter}: expected a strength in [0, 1)")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p={self.flip_p}: expected a probability in [0, 1]")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        pil = to_pil(image)
        box = random_resized_crop_box(pil.width, pil.height, self.scale, self.ratio, rng)
        pil = pil.resize((self.image_size, self.image_size), _RESAMPLE, box=box)
        factors = 1.0 + self.jitter * rng.uniform(-1.0, 1.0, size=3)
        if rng.uniform() < self.flip_p:  # before the jitter, which does not depend on position
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(colour_jitter(to_array(pil), *factors))


def train_transform(image_size: int = 128) -> TrainTransform:
    return TrainTransform(image_size=image_size)


def test_transform(image_size: int = 128, resize: int = 146, kind: str = TEST_TRANSFORMS[0]
                   ) -> EvalTransform:
    return EvalTransform(image_size=image_size, resize=resize, kind=kind)


test_transform.__test__ = False  # a factory, not a pytest test, when imported into a test module


def default_resize(image_size: int) -> int:
    """The test transform's resize for an input size: the paper's 146 for 128 px, scaled."""
    return round(image_size * 146 / 128)
