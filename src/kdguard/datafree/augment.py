"""Batched, differentiable image transforms used by the data-free methods (no per-sample loops).

* :func:`random_resized_crop`: CMI's "local view" (RandomResizedCrop, area 0.25–1) + flip, via
  one ``affine_grid``/``grid_sample`` call, so gradients flow back to the generator.
* :func:`jitter_flip`: DeepInversion's random roll (up to H/8, W/8) and horizontal flip of the
  whole batch (NVIDIA/CMI ``jitter_and_flip``).
* :func:`cutmix`: CutMix (Yun et al., ICCV 2019) as in ABD's OOD KD: one λ ~ Beta(β, β) and one
  box per batch, pasted from a permutation of the batch.
* :func:`color_jitter`: brightness/contrast/saturation jitter applied with a probability.
* :func:`single_image_patches`: Asano & Saeed's single-image patch data set, batched.
* :func:`fit_images`: resize / change channels of a proxy data set to the teacher's input shape.

Randomness: tensors are drawn from a :class:`torch.Generator` (``rng``) on the data's device;
Python-side scalars (a roll offset, a CutMix box) from a :class:`random.Random` (``host_rng``),
so nothing waits for the accelerator and both states can be checkpointed.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..errors import KDGuardError


def _uniform(n: int, low: float, high: float, rng: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    where = rng.device if rng is not None else device
    return (torch.rand(n, generator=rng, device=where) * (high - low) + low).to(device)


def _check_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise KDGuardError(f"{what} needs an N×C×H×W tensor, got "
                           f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}",
                           "pass a whole batch")


def random_resized_crop(x: torch.Tensor, *, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        rng: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random resized crop (+ horizontal flip with p = 0.5), bilinear, same size out.

    Area fraction ``a ~ U(scale)`` and log-aspect ``log r ~ U(log ratio)`` as torchvision/kornia;
    a crop that would exceed the image is shrunk to fit (instead of torchvision's 10 retries and
    centre-crop fallback). ``x`` float ``N×C×H×W`` (gradients flow through) → same shape.

    Raises:
        KDGuardError: ``x`` is not a batch or ``scale`` is not within (0, 1].
    """
    _check_batch(x, "random_resized_crop")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise KDGuardError(f"crop scale {tuple(scale)} is not 0 < low <= high <= 1",
                           "use e.g. [0.25, 1.0] (CMI's local view)")
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, scale[0], scale[1], rng, dev)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), rng, dev)
    r = log_r.exp()
    fw = (area * r * h / w).sqrt().clamp(max=1.0)     # crop width / image width
    fh = (area / r * w / h).sqrt().clamp(max=1.0)
    cx = (_uniform(n, -1.0, 1.0, rng, dev)) * (1.0 - fw)
    cy = (_uniform(n, -1.0, 1.0, rng, dev)) * (1.0 - fh)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(_uniform(n, 0.0, 1.0, rng, dev) < 0.5, -sign, sign)
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
    _check_batch(x, "jitter_flip")
    dy = host_rng.randint(-max_shift[0], max_shift[0]) if max_shift[0] > 0 else 0
    dx = host_rng.randint(-max_shift[1], max_shift[1]) if max_shift[1] > 0 else 0
    out = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
    if flip and host_rng.random() < 0.5:
        out = out.flip(3)
    return out


def cutmix(x: torch.Tensor, *, beta: float, prob: float, rng: torch.Generator | None,
           host_rng: random.Random) -> torch.Tensor:
    """CutMix without labels (KD needs none): paste one random box from a shuffled copy.

    With probability ``prob``: ``λ ~ Beta(β, β)``, a box of side ``√(1−λ)·(H, W)`` centred at a
    uniform pixel (clipped at the borders), filled from ``x[perm]`` (ABD ``vanilla_kd_ood.py``,
    ``rand_bbox``). ``x`` ``N×C×H×W`` → a new tensor of the same shape.

    Raises:
        KDGuardError: ``beta <= 0`` or ``prob`` outside [0, 1].
    """
    _check_batch(x, "cutmix")
    if beta <= 0 or not 0.0 <= prob <= 1.0:
        raise KDGuardError(f"cutmix beta={beta}, prob={prob} are invalid",
                           "use beta > 0 (ABD: 0.25) and prob in [0, 1] (ABD: 1.0)")
    if host_rng.random() >= prob:
        return x
    lam = host_rng.betavariate(beta, beta)
    n, _, h, w = x.shape
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = host_rng.randrange(h), host_rng.randrange(w)
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    if y2 <= y1 or x2 <= x1:
        return x
    where = rng.device if rng is not None else x.device
    perm = torch.randperm(n, generator=rng, device=where).to(x.device)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return out


def color_jitter(x: torch.Tensor, *, prob: float, strength: float = 0.4,
                 rng: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (factors ``U(1−s, 1+s)``), per sample with
    probability ``prob``; result clamped to [0, 1]. ``x`` float ``N×C×H×W`` in [0, 1]."""
    _check_batch(x, "color_jitter")
    n, c = x.shape[:2]
    dev = x.device
    apply = (_uniform(n, 0.0, 1.0, rng, dev) < prob).view(n, 1, 1, 1)
    b, k, s = (_uniform(n, 1 - strength, 1 + strength, rng, dev).view(n, 1, 1, 1) for _ in range(3))
    out = x * b
    gray = out.mean(dim=1, keepdim=True) if c == 1 else (
        0.299 * out[:, :1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
    out = (out - gray.mean(dim=(2, 3), keepdim=True)) * k + gray.mean(dim=(2, 3), keepdim=True)
    if c == 3:
        gray = 0.299 * out[:, :1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
        out = gray + (out - gray) * s
    return torch.where(apply, out.clamp(0.0, 1.0), x)


def _affine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compose batches of 2×3 affine maps: ``(a ∘ b)(p) = a(b(p))``."""
    full = lambda m: torch.cat([m, m.new_tensor([0.0, 0.0, 1.0]).expand(len(m), 1, 3)], dim=1)  # noqa: E731
    return (full(a) @ full(b))[:, :2]


def _patch_maps(n: int, src_hw: tuple[int, int], out_hw: tuple[int, int], *, initial_crop: float,
                min_area: float, rotation: float, shear: float,
                rng: torch.Generator) -> torch.Tensor:
    """``n×2×3`` maps from patch coordinates to source-image coordinates (normalised [-1, 1])."""
    dev = rng.device
    hi, wi = src_hw
    side = initial_crop * min(hi, wi)
    fx0, fy0 = side / wi, side / hi
    init = torch.zeros(n, 2, 3, device=dev)
    init[:, 0, 0], init[:, 1, 1] = fx0, fy0
    init[:, 0, 2] = _uniform(n, -1, 1, rng, dev) * (1 - fx0)
    init[:, 1, 2] = _uniform(n, -1, 1, rng, dev) * (1 - fy0)
    # Random-resized crop inside the (square) initial crop, area in [min_area, 1].
    area = _uniform(n, min_area, 1.0, rng, dev)
    r = _uniform(n, math.log(3 / 4), math.log(4 / 3), rng, dev).exp()
    fw, fh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    rrc = torch.zeros(n, 2, 3, device=dev)
    rrc[:, 0, 0], rrc[:, 1, 1] = fw, fh
    rrc[:, 0, 2] = _uniform(n, -1, 1, rng, dev) * (1 - fw)
    rrc[:, 1, 2] = _uniform(n, -1, 1, rng, dev) * (1 - fh)
    # Rotation and shear of the √2-larger crop, then its centre 1/√2 (Asano et al.'s order).
    phi = _uniform(n, -rotation, rotation, rng, dev) * math.pi / 180
    psi = _uniform(n, -shear, shear, rng, dev) * math.pi / 180
    rot = torch.zeros(n, 2, 3, device=dev)
    rot[:, 0, 0], rot[:, 0, 1] = phi.cos(), -phi.sin() + phi.cos() * psi.tan()
    rot[:, 1, 0], rot[:, 1, 1] = phi.sin(), phi.cos() + phi.sin() * psi.tan()
    centre = torch.zeros(n, 2, 3, device=dev)
    centre[:, 0, 0] = centre[:, 1, 1] = 1 / math.sqrt(2)
    return _affine(init, _affine(rrc, _affine(rot, centre)))


def single_image_patches(image: torch.Tensor, n: int, size: tuple[int, int], *, rng: torch.Generator,
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
        rng: generator for every random draw (its device is used for the work).

    Returns:
        ``uint8`` ``n×C×h×w`` on ``rng``'s device.

    Raises:
        KDGuardError: ``image`` is not ``C×H×W`` uint8 or ``n < 1``.
    """
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise KDGuardError(f"source image must be uint8 C×H×W, got {image.dtype} {tuple(image.shape)}",
                           "load it with kdguard.datafree.proxy.read_image")
    if n < 1:
        raise KDGuardError(f"patch count {n} must be >= 1", "set ood.patches to a positive number")
    dev = rng.device
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
                            min_area=min_area, rotation=rotation, shear=shear, rng=rng)
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
        patches = color_jitter(patches, prob=color_prob, rng=rng)
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
