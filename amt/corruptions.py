"""Common corruptions (Hendrycks & Dietterich, ICLR 2019) on [0, 1] image batches [B, 3, H, W].

Parameters follow ImageNet-C's ``make_imagenet_c.py`` at 224 px. Noise levels, contrast,
brightness and JPEG quality do not depend on resolution and are kept; blur radii and widths are
in pixels, so they are scaled by 128/224 for the 128-px images of this benchmark (``BLUR_SCALE``).
Random corruptions draw from the given ``torch.Generator`` only (same generator state, same
output); every output is clamped to [0, 1] and keeps the input's dtype and device.

Differences from ImageNet-C, all deliberate: blurs pad by replicating the border (ImageNet-C's
scipy/OpenCV default reflects), brightness shifts V of HSV by scaling RGB (the exact HSV
round trip, see ``brightness``), impulse noise is salt-and-pepper with equal odds as skimage.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from amt.registry import SEVERITIES

BLUR_SCALE = 128 / 224

GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE_PHOTONS = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE_NOISE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
# (disk radius in px at 224, sigma of the anti-aliasing blur of the disk kernel)
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
GAUSSIAN_BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)  # px at 224
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
JPEG_QUALITY = (25, 18, 15, 10, 7)

Gen = torch.Generator | None
Corruption = Callable[[torch.Tensor, int, Gen], torch.Tensor]


# -- helpers --------------------------------------------------------------------------------------
def _generator(generator: Gen, name: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"corruption {name!r} is random: pass a torch.Generator so the result "
                         "is reproducible")
    return generator


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with a normalised odd square kernel, border replicated."""
    size = kernel.shape[-1]
    weight = (kernel / kernel.sum()).to(x).expand(x.shape[1], 1, size, size)
    padded = F.pad(x, [size // 2] * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=x.shape[1])


def gaussian_kernel(sigma: float, radius: int | None = None) -> torch.Tensor:
    """2-D Gaussian, truncated at 4 sigma (scipy's default) unless ``radius`` is given."""
    radius = max(1, math.ceil(4 * sigma)) if radius is None else radius
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-(grid**2) / (2 * sigma**2))
    return torch.outer(line, line)


def disk_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a disk of ``radius`` px, softened by a 3x3 Gaussian."""
    reach = math.ceil(radius) + 1
    grid = torch.arange(-reach, reach + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).to(torch.float64)
    soften = gaussian_kernel(alias_sigma, radius=1)
    soft = F.conv2d(disk[None, None], (soften / soften.sum())[None, None], padding=1)
    return soft[0, 0]


# -- corruptions ----------------------------------------------------------------------------------
def _gaussian_noise(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    g = _generator(generator, "gaussian_noise")
    noise = torch.randn(x.shape, generator=g, device=g.device).to(x)
    return x + GAUSSIAN_NOISE_STD[severity - 1] * noise


def _shot_noise(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    """Poisson photon counts at ``photons`` per unit intensity."""
    g = _generator(generator, "shot_noise")
    photons = SHOT_NOISE_PHOTONS[severity - 1]
    counts = torch.poisson((x * photons).to(device=g.device, dtype=torch.float32), generator=g)
    return counts.to(x) / photons


def _impulse_noise(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    """Salt and pepper: a fraction ``amount`` of the values, half set to 1, half to 0."""
    g = _generator(generator, "impulse_noise")
    amount = IMPULSE_NOISE_AMOUNT[severity - 1]
    u = torch.rand(x.shape, generator=g, device=g.device).to(x)
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), out)


def _defocus_blur(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    radius, alias_sigma = DEFOCUS_BLUR[severity - 1]
    return _blur(x, disk_kernel(radius * BLUR_SCALE, alias_sigma))


def _gaussian_blur(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    return _blur(x, gaussian_kernel(GAUSSIAN_BLUR_SIGMA[severity - 1] * BLUR_SCALE))


def _contrast(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    """Pull every channel towards its own mean over the image."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * CONTRAST_FACTOR[severity - 1] + means


def _brightness(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    """V ← min(V + c, 1) in HSV. With H and S fixed, RGB is proportional to V, so scaling RGB by
    V'/V is the exact round trip; black pixels (V = 0, S = 0) become grey V'."""
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + BRIGHTNESS_SHIFT[severity - 1]).clamp(max=1.0)
    scale = brighter / value.clamp(min=torch.finfo(x.dtype).tiny)
    return torch.where(value > 0, x * scale, brighter.expand_as(x))


def _jpeg(x: torch.Tensor, severity: int, generator: Gen) -> torch.Tensor:
    """Encode and decode each image as JPEG (PIL) at ImageNet-C's quality."""
    quality = JPEG_QUALITY[severity - 1]
    pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    decoded = []
    for image in pixels.numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=x.device, dtype=x.dtype) / 255


_KERNELS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness,
    "jpeg": _jpeg,
}


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 \
            or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"corrupt: expected a float tensor [B, 3, H, W], got {shape}")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise ValueError(f"corrupt: pixel values span [{low:.3g}, {high:.3g}]; expected [0, 1] "
                         "(corrupt before normalising)")


def corrupt(x: torch.Tensor, name: str, severity: int, generator: Gen = None) -> torch.Tensor:
    """``x`` corrupted by ``name`` at ``severity`` (1..5), clamped to [0, 1]."""
    if name not in _KERNELS:
        raise ValueError(f"unknown corruption {name!r}; known: {sorted(_KERNELS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"corruption {name}: severity {severity!r}; expected one of "
                         f"{list(SEVERITIES)}")
    _check_images(x)
    with torch.no_grad():
        return _KERNELS[name](x, int(severity), generator).clamp(0, 1)


def _checked(name: str) -> Corruption:
    def apply(x: torch.Tensor, severity: int, generator: Gen = None) -> torch.Tensor:
        return corrupt(x, name, severity, generator)

    apply.__name__ = name
    apply.__doc__ = _KERNELS[name].__doc__
    return apply


# name -> fn(x, severity, generator): each validates its input and clamps like ``corrupt``.
CORRUPTIONS: dict[str, Corruption] = {name: _checked(name) for name in _KERNELS}
