"""Transforms: output contract, reproducibility, and agreement with the reference semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from amt import transforms as T


def _image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


@pytest.mark.parametrize("shape", [(160, 240, 3), (240, 160, 3), (7, 5, 3), (28, 28, 1)])
@pytest.mark.parametrize("transform", [T.train_transform(32), T.test_transform(32, 36)])
def test_output_contract(shape, transform):
    x = transform(_image(*shape), np.random.default_rng(1))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.std() > 0.01  # the content came through (downscaled noise averages out)


def test_greyscale_becomes_three_equal_channels():
    grey = _image(30, 40, channels=1)
    for transform in (T.train_transform(16), T.test_transform(16, 18)):
        x = transform(grey, np.random.default_rng(3))
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    rgb = np.repeat(grey, 3, axis=2)  # the same pixels stored as RGB give the same tensor
    assert torch.equal(T.test_transform(16, 18)(grey, None), T.test_transform(16, 18)(rgb, None))


def test_train_transform_randomness_comes_only_from_the_generator():
    image, transform = _image(50, 70), T.train_transform(24)
    a = transform(image, np.random.default_rng(5))
    np.random.seed(0), torch.manual_seed(0)  # global generators must not matter
    assert torch.equal(a, transform(image, np.random.default_rng(5)))
    assert not torch.equal(a, transform(image, np.random.default_rng(6)))


def test_eval_transform_is_resize_then_centre_crop():
    # 30x20 (w x h) with resize 14: shorter side 20 -> 14, width int(14 * 30 / 20) = 21; crop 12
    # at top round(2 / 2) = 1, left round(9 / 2) = 4 (round half to even, as torchvision).
    image = _image(20, 30, seed=2)
    resized = np.asarray(Image.fromarray(image).resize((21, 14), Image.Resampling.BILINEAR))
    expected = torch.from_numpy(resized[1:13, 4:16].copy()).permute(2, 0, 1).float() / 255
    got = T.test_transform(12, 14)(image, np.random.default_rng(0))
    assert (got - expected).abs().max() <= 1 / 255 + 1e-6  # one PIL rounding step at most
    assert torch.equal(got, T.test_transform(12, 14)(image, np.random.default_rng(9)))
    # Exact on content that resizing cannot blur: the crop of a constant-column image.
    columns = np.repeat(np.repeat(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], 3, 2),
                        20, axis=0)  # 20 x 30, column j has value 8 j
    crop = T.test_transform(20, 20)(columns, None)  # no resize: crop columns 5..24
    assert torch.allclose(crop[0, 0], torch.arange(40, 200, 8) / 255)


def test_squash_transform_is_square_resize_then_centre_crop():
    """BSCD-FSL's Resize([147, 147]) then CenterCrop(128), scaled down: a 30x20 (w x h) image
    squashed to 14 x 14 (aspect not kept), crop 12 at offset round(2 / 2) = 1."""
    image = _image(20, 30, seed=3)
    resized = np.asarray(Image.fromarray(image).resize((14, 14), Image.Resampling.BILINEAR))
    expected = torch.from_numpy(resized[1:13, 1:13].copy()).permute(2, 0, 1).float() / 255
    got = T.test_transform(12, 14, "squash")(image, None)
    assert got.shape == (3, 12, 12)
    assert (got - expected).abs().max() <= 1 / 255 + 1e-6  # one PIL rounding step at most
    # a wide image keeps all its columns' content (squashed), unlike the aspect-keeping crop
    columns = np.repeat(np.repeat(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], 3, 2),
                        20, axis=0)  # 20 x 30, column j has value 8 j
    squashed = T.test_transform(20, 20, "squash")(columns, None)[0, 0]
    cropped = T.test_transform(20, 20)(columns, None)[0, 0]
    assert squashed[0] < cropped[0] and squashed[-1] > cropped[-1]
    with pytest.raises(ValueError, match="test transform 'stretch'"):
        T.test_transform(12, 14, "stretch")


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = T.random_resized_crop_box(240, 160, (0.08, 1.0), (3 / 4, 4 / 3),
                                                             rng)
        assert 0 <= left < right <= 240 and 0 <= top < bottom <= 160
        w, h = right - left, bottom - top
        areas.append(w * h / (240 * 160))
        ratios.append(w / h)
    assert 0.07 < min(areas) < 0.09 and max(areas) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # A 300x10 strip never fits a 3/4..4/3 crop: the fallback is the centre crop at ratio 4/3.
    assert T.random_resized_crop_box(300, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (143, 0, 156, 10)
    assert T.random_resized_crop_box(10, 300, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 143, 10, 156)


@pytest.mark.parametrize("factors", [(0.7, 1.3, 0.8), (1.4, 0.6, 1.35), (1.0, 1.0, 1.0)])
def test_colour_jitter_matches_pil_image_enhance(factors):
    image = Image.fromarray(_image(20, 24, seed=4))
    expected = image
    for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast,
                                 ImageEnhance.Color), factors, strict=True):
        expected = enhancer(expected).enhance(factor)
    got = T.colour_jitter(T.to_array(image), *factors)
    # PIL rounds to uint8 after each of the three steps; we do not.
    assert np.abs(got - T.to_array(expected)).max() <= 3 / 255


def test_flip_mirrors_the_image():
    image = _image(16, 16, seed=7)
    whole = dict(image_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0)
    flipped = T.TrainTransform(flip_p=1.0, **whole)(image, np.random.default_rng(0))
    plain = T.TrainTransform(flip_p=0.0, **whole)(image, np.random.default_rng(0))
    assert torch.equal(flipped, plain.flip(-1))
    assert torch.allclose(plain, torch.from_numpy(image).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8), np.uint8), r"shape \(8, 8\)"),
    (np.zeros((8, 8, 4), np.uint8), r"shape \(8, 8, 4\)"),
])
def test_bad_images_are_rejected(image, message):
    with pytest.raises(ValueError, match=message):
        T.test_transform(8, 8)(image, None)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="resize=100 is smaller than image_size=128"):
        T.test_transform(128, 100)
    with pytest.raises(ValueError, match="image_size=0"):
        T.train_transform(0)
    with pytest.raises(ValueError, match="flip_p=2"):
        T.TrainTransform(flip_p=2)
