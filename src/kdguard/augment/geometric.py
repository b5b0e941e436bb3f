"""Geometric augmentations on whole batches (no per-sample loops), each drawing from an explicit
generator.

* :func:`random_resized_crop`: CMI's "local view" (RandomResizedCrop, area 0.25–1) + flip, via
  one ``affine_grid``/``grid_sample`` call, so gradients flow back to a generator network.
* :func:`jitter_flip`: DeepInversion's random roll (up to H/8, W/8) and horizontal flip of the
  whole batch (NVIDIA/CMI ``jitter_and_flip``), from a :class:`random.Random` (host-side scalars).
* :func:`crop_boxes` + :func:`resized_crop`: torchvision's ``RandomResizedCrop`` rule (SimCLR's
  crop) with integer pixel boxes, then one bilinear resampling.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import KDGuardError
from ._random import check_batch, rand, uniform


def random_resized_crop(x: torch.Tensor, *, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        generator: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop (+ horizontal flip with p = 0.5), bilinear, same size out.

    Area fraction ``a ~ U(scale)`` and log-aspect ``log r ~ U(log ratio)`` as torchvision/kornia;
    a crop that would exceed the image is shrunk to fit (instead of torchvision's 10 retries and
    centre-crop fallback). ``x`` float ``N×C×H×W`` (gradients flow through) → same shape.

    Raises:
        KDGuardError: ``x`` is not a batch or ``scale`` is not within (0, 1].
    """
    check_batch(x, "random_resized_crop")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise KDGuardError(f"crop scale {tuple(scale)} is not 0 < low <= high <= 1",
                           "use e.g. [0.25, 1.0] (CMI's local view)")
    n, _, h, w = x.shape
    dev = x.device
    area = uniform(n, scale[0], scale[1], generator, dev)
    log_r = uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    r = log_r.exp()
    fw = (area * r * h / w).sqrt().clamp(max=1.0)     # crop width / image width
    fh = (area / r * w / h).sqrt().clamp(max=1.0)
    cx = (uniform(n, -1.0, 1.0, generator, dev)) * (1.0 - fw)
    cy = (uniform(n, -1.0, 1.0, generator, dev)) * (1.0 - fh)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(uniform(n, 0.0, 1.0, generator, dev) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0] = fw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def jitter_flip(x: torch.Tensor, *, max_shift: tuple[int, int], flip: bool,
                host_rng: random.Random) -> torch.Tensor:
    """Roll the whole batch by one random offset in ``[-max_shift, max_shift]`` per axis and flip
    it horizontally with p = 0.5 (DeepInversion; Yin et al. 2020 §3.2 "random jitter/flips").

    ``x`` ``N×C×H×W`` (differentiable) → same shape.
    """
    check_batch(x, "jitter_flip")
    dy = host_rng.randint(-max_shift[0], max_shift[0]) if max_shift[0] > 0 else 0
    dx = host_rng.randint(-max_shift[1], max_shift[1]) if max_shift[1] > 0 else 0
    out = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
    if flip and host_rng.random() < 0.5:
        out = out.flip(3)
    return out


def crop_boxes(n: int, height: int, width: int, *, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10,
               generator: torch.Generator) -> torch.Tensor:
    """Random crop boxes of torchvision's ``RandomResizedCrop`` rule, ``n×4`` float ``(top, left, h, w)``.

    Per image, up to ``attempts`` candidates ``(area·s, ratio r)`` are drawn; the first that fits
    inside ``height × width`` is used with a uniform integer offset; if none fits, the whole image.
    Sizes are in pixels (integers stored as float).

    Raises:
        KDGuardError: ``scale`` not within (0, 1] with low ≤ high, or ``ratio`` not positive.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise KDGuardError(f"crop scale {tuple(scale)!r} is not 0 < low <= high <= 1",
                           "use e.g. (0.08, 1.0)")
    if not 0 < ratio[0] <= ratio[1]:
        raise KDGuardError(f"crop ratio {tuple(ratio)!r} is not 0 < low <= high", "use (3/4, 4/3)")
    area = height * width
    s = uniform(n * attempts, lo, hi, generator).view(n, attempts)
    log_r = uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, attempts)
    r = log_r.exp()
    w = torch.round(torch.sqrt(area * s * r))
    h = torch.round(torch.sqrt(area * s / r))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    ok = first >= 0
    h_sel = torch.where(ok, h[rows, first.clamp(min=0)], torch.full((n,), float(height)))
    w_sel = torch.where(ok, w[rows, first.clamp(min=0)], torch.full((n,), float(width)))
    top = torch.floor(rand(n, generator) * (height - h_sel + 1))
    left = torch.floor(rand(n, generator) * (width - w_sel + 1))
    return torch.stack([top, left, h_sel, w_sel], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int],
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` (``N×4`` ``(top, left, h, w)`` pixels) out of ``x`` and resize to ``size``.

    Bilinear sampling of the box through one ``affine_grid``/``grid_sample`` call (edge-aligned
    coordinates, ``align_corners=False``), optionally mirrored left–right where ``flip`` (``N``
    bool) is True. ``x`` float ``N×C×H×W`` → float ``N×C×size[0]×size[1]`` on the same device.
    """
    check_batch(x, "resized_crop", floating=True)
    n, _, height, width = x.shape
    b = boxes.to(device=x.device, dtype=torch.float32)
    top, left, h, w = b.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip.to(x.device), -sx, sx)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], int(size[0]), int(size[1])], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
