"""Proxy images for data-free distillation: Asano & Saeed's single-image patches, and fitting a
proxy data set to the teacher's input shape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KDGuardError
from ._random import uniform
from .color import bcs_jitter


def _affine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compose batches of 2×3 affine maps: ``(a ∘ b)(p) = a(b(p))``."""
    full = lambda m: torch.cat([m, m.new_tensor([0.0, 0.0, 1.0]).expand(len(m), 1, 3)], dim=1)  # noqa: E731
    return (full(a) @ full(b))[:, :2]


def _patch_maps(n: int, src_hw: tuple[int, int], out_hw: tuple[int, int], *, initial_crop: float,
                min_area: float, rotation: float, shear: float,
                generator: torch.Generator) -> torch.Tensor:
    """``n×2×3`` maps from patch coordinates to source-image coordinates (normalised [-1, 1])."""
    dev = generator.device
    hi, wi = src_hw
    side = initial_crop * min(hi, wi)
    fx0, fy0 = side / wi, side / hi
    init = torch.zeros(n, 2, 3, device=dev)
    init[:, 0, 0], init[:, 1, 1] = fx0, fy0
    init[:, 0, 2] = uniform(n, -1, 1, generator, dev) * (1 - fx0)
    init[:, 1, 2] = uniform(n, -1, 1, generator, dev) * (1 - fy0)
    # Random-resized crop inside the (square) initial crop, area in [min_area, 1].
    area = uniform(n, min_area, 1.0, generator, dev)
    r = uniform(n, math.log(3 / 4), math.log(4 / 3), generator, dev).exp()
    fw, fh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    rrc = torch.zeros(n, 2, 3, device=dev)
    rrc[:, 0, 0], rrc[:, 1, 1] = fw, fh
    rrc[:, 0, 2] = uniform(n, -1, 1, generator, dev) * (1 - fw)
    rrc[:, 1, 2] = uniform(n, -1, 1, generator, dev) * (1 - fh)
    # Rotation and shear of the √2-larger crop, then its centre 1/√2 (Asano et al.'s order).
    phi = uniform(n, -rotation, rotation, generator, dev) * math.pi / 180
    psi = uniform(n, -shear, shear, generator, dev) * math.pi / 180
    rot = torch.zeros(n, 2, 3, device=dev)
    rot[:, 0, 0], rot[:, 0, 1] = phi.cos(), -phi.sin() + phi.cos() * psi.tan()
    rot[:, 1, 0], rot[:, 1, 1] = phi.sin(), phi.cos() + phi.sin() * psi.tan()
    centre = torch.zeros(n, 2, 3, device=dev)
    centre[:, 0, 0] = centre[:, 1, 1] = 1 / math.sqrt(2)
    return _affine(init, _affine(rrc, _affine(rot, centre)))


def single_image_patches(image: torch.Tensor, n: int, size: tuple[int, int], *, generator: torch.Generator,
                         initial_crop: float = 0.5, min_area: float = 0.002, rotation: float = 30.0,
                         shear: float = 30.0, color_prob: float = 0.5, chunk: int = 2048) -> torch.Tensor:
    """``n`` random patches of one image, the OOD data of ABD (after Asano & Saeed, ICLR 2023).

    A batched re-implementation of ``make_single_img_dataset.py``: a random square crop of
    ``initial_crop`` × the short side, a random resized crop of area ``[min_area, 1]`` of it
    (aspect 3/4–4/3) at √2 × the patch size, a random rotation (±``rotation``°) and shear
    (±``shear``°), the central patch, then colour jitter with probability ``color_prob`` (hue
    jitter omitted). Each patch is sampled bilinearly from the level of an anti-aliased image
    pyramid that matches its zoom, so heavy down-scaling does not alias.

    Args:
        image: ``uint8`` ``C×H×W`` (any size ≥ the patch size).
        n: number of patches.
        size: ``(h, w)`` of a patch.
        generator: generator for every random draw (its device is used for the work).

    Returns:
        ``uint8`` ``n×C×h×w`` on ``generator``'s device.

    Raises:
        KDGuardError: ``image`` is not ``C×H×W`` uint8 or ``n < 1``.
    """
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise KDGuardError(f"source image must be uint8 C×H×W, got {image.dtype} {tuple(image.shape)}",
                           "load it with kdguard.datafree.proxy.read_image")
    if n < 1:
        raise KDGuardError(f"patch count {n} must be >= 1", "set ood.patches to a positive number")
    dev = generator.device
    src = image.to(dev).float().div(255.0).unsqueeze(0)
    pyramid = [src]
    while min(pyramid[-1].shape[-2:]) >= 2 * max(size):
        pyramid.append(F.interpolate(pyramid[-1], scale_factor=0.5, mode="bilinear",
                                     antialias=True, align_corners=False))
    h, w = size
    out = torch.empty(n, image.shape[0], h, w, dtype=torch.uint8, device=dev)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        theta = _patch_maps(m, tuple(image.shape[1:]), size, initial_crop=initial_crop,
                            min_area=min_area, rotation=rotation, shear=shear, generator=generator)
        # Source pixels per output pixel: sqrt of the map's area scaling in pixel units.
        zoom = (theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]).abs()
        zoom = (zoom * image.shape[1] * image.shape[2] / (h * w)).sqrt()
        level = zoom.clamp_min(1.0).log2().floor().long().clamp(max=len(pyramid) - 1)
        grid = F.affine_grid(theta, [m, 1, h, w], align_corners=False)
        patches = torch.empty(m, image.shape[0], h, w, device=dev)
        for lv in level.unique().tolist():
            idx = (level == lv).nonzero().squeeze(1)
            g = grid[idx].reshape(1, len(idx) * h, w, 2)     # one tall grid over one image
            sampled = F.grid_sample(pyramid[lv], g, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
            patches[idx] = sampled.view(image.shape[0], len(idx), h, w).transpose(0, 1)
        patches = bcs_jitter(patches, prob=color_prob, generator=generator)
        out[start:start + m] = patches.mul(255.0).round().clamp(0, 255).to(torch.uint8)
    return out


def fit_images(images: torch.Tensor, shape: tuple[int, int, int], chunk: int = 4096) -> torch.Tensor:
    """Bring ``uint8`` ``N×C'×H'×W'`` images to ``shape = (C, H, W)`` for a proxy data set.

    Channels: 3 → 1 by ITU-R BT.601 luma, 1 → 3 by repetition. Size: anti-aliased bilinear
    resize. Returns ``uint8`` ``N×C×H×W`` (the input itself when nothing changes).

    Raises:
        KDGuardError: channel counts other than 1 and 3.
    """
    c, h, w = shape
    if images.dim() != 4 or images.shape[1] not in (1, 3) or c not in (1, 3):
        raise KDGuardError(f"cannot convert images of shape {tuple(images.shape)} to {shape}",
                           "use proxy images with 1 or 3 channels")
    if tuple(images.shape[1:]) == (c, h, w):
        return images
    out = torch.empty(len(images), c, h, w, dtype=torch.uint8)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float()
        if x.shape[1] == 3 and c == 1:
            x = (x * luma).sum(dim=1, keepdim=True)
        elif x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out
