"""Common corruptions: range, severity ordering, determinism, exact pieces, errors."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F

from amt.corruptions import (
    CORRUPTIONS,
    GAUSSIAN_NOISE_STD,
    corrupt,
    disk_kernel,
    gaussian_kernel,
)

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth, textured colour images in (0, 1): upsampled noise plus a gradient."""
    g = torch.Generator().manual_seed(0)
    coarse = F.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=64, mode="bicubic",
                           align_corners=False)
    ramp = torch.linspace(0, 0.3, 64).view(1, 1, 1, 64)
    return (0.15 + 0.6 * coarse.clamp(0, 1) + ramp).clamp(0.02, 0.98)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_shape_dtype_range_and_severity_order(images: torch.Tensor, name: str) -> None:
    changes = []
    for severity in range(1, 6):
        out = corrupt(images, name, severity, _gen())
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
        changes.append((out - images).abs().mean().item())
    assert changes[0] > 1e-3, f"{name} severity 1 barely changes the image"
    assert all(a < b for a, b in zip(changes, changes[1:], strict=False)), (name, changes)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_deterministic_given_the_generator(images: torch.Tensor, name: str) -> None:
    first = CORRUPTIONS[name](images, 3, _gen(7))
    assert torch.equal(first, CORRUPTIONS[name](images, 3, _gen(7)))
    if name in RANDOM:
        assert not torch.equal(first, CORRUPTIONS[name](images, 3, _gen(8)))


def test_random_corruptions_need_a_generator(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="'shot_noise' is random: pass a torch.Generator"):
        corrupt(images, "shot_noise", 1)
    assert torch.equal(corrupt(images, "contrast", 2), corrupt(images, "contrast", 2))


def test_gaussian_noise_has_imagenet_c_std() -> None:
    grey = torch.full((4, 3, 64, 64), 0.5)
    noise = corrupt(grey, "gaussian_noise", 2, _gen()) - grey
    assert noise.std().item() == pytest.approx(GAUSSIAN_NOISE_STD[1], rel=0.03)


def test_brightness_is_the_hsv_round_trip(images: torch.Tensor) -> None:
    out = corrupt(images, "brightness", 3)
    for b, y, x in [(0, 5, 7), (1, 30, 2), (2, 63, 40)]:
        h, s, v = colorsys.rgb_to_hsv(*images[b, :, y, x].tolist())
        expected = colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))
        assert out[b, :, y, x].tolist() == pytest.approx(expected, abs=1e-6)
    black = corrupt(torch.zeros(1, 3, 4, 4), "brightness", 1)
    assert torch.allclose(black, torch.full_like(black, 0.1))


def test_contrast_keeps_channel_means(images: torch.Tensor) -> None:
    out = corrupt(images, "contrast", 4)
    assert torch.allclose(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-6)
    assert out.std() < 0.2 * images.std()


def test_blur_kernels() -> None:
    disk = disk_kernel(3.0, 0.5)
    assert disk.shape == (9, 9) and torch.equal(disk, disk.T)
    assert disk[4, 4] > disk[4, 1] > disk[4, 0]  # flat inside, soft edge, ~0 outside
    assert gaussian_kernel(1.0).shape == (9, 9)  # truncated at 4 sigma
    flat = torch.full((1, 3, 32, 32), 0.4)
    for name in ("defocus_blur", "gaussian_blur"):
        assert torch.allclose(corrupt(flat, name, 5), flat, atol=1e-6)  # blur keeps flat images


def test_jpeg_blocks_appear(images: torch.Tensor) -> None:
    out = corrupt(images, "jpeg", 5)
    assert not torch.equal(out, images)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)  # decoded 8-bit pixels


@pytest.mark.parametrize(("name", "severity", "message"), [
    ("fog", 1, r"unknown corruption 'fog'; known: \['brightness', 'contrast'"),
    ("contrast", 0, r"corruption contrast: severity 0; expected one of \[1, 2, 3, 4, 5\]"),
    ("contrast", 6, r"severity 6"),
    ("contrast", True, r"severity True"),
])
def test_bad_name_or_severity(images: torch.Tensor, name: str, severity: int,
                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(images, name, severity, _gen())


def test_bad_images_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected a float tensor \[B, 3, H, W\], got \(3, 8"):
        corrupt(torch.rand(3, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match=r"span \[-0.5, 0.5\]; expected \[0, 1\]"):
        corrupt(torch.linspace(-0.5, 0.5, 192).view(1, 3, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match=r"got \(1, 3, 8, 8\)"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "contrast", 1)
