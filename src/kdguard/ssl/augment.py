"""SimCLR's data augmentation on whole batches, in plain torch (no torchvision).

The CIFAR recipe of SimCLR (Chen et al., ICML 2020, Appendix A and B.9) as BadEncoder's
``train_transform`` (Jia et al., S&P 2022, ``datasets/cifar10_dataset.py``) and paper 1's code use
it, in this order, per image:

1. random resized crop to the output size: area fraction ``s ~ U(scale)`` (0.08–1), log aspect
   ratio ``~ U(log 3/4, log 4/3)``, up to 10 draws until the box fits, else the whole image
   (torchvision's ``RandomResizedCrop`` rule; its fallback is a centre crop at the clamped aspect
   ratio, which is the whole image for square inputs); bilinear resampling;
2. horizontal flip with probability 0.5;
3. with probability 0.8, colour jitter with brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1,
   the four operations in a random order per image (torchvision ``ColorJitter`` semantics:
   brightness ``x·b``; contrast ``c·x + (1−c)·mean(gray(x))``; saturation ``s·x + (1−s)·gray(x)``;
   hue: rotate H in HSV by ``h`` turns; each factor uniform in ``[1−a, 1+a]``, hue in ``[−a, a]``;
   results clipped to [0, 1]);
4. with probability 0.2, grayscale (ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` in every channel).

All random parameters of a batch are drawn in a few calls from a CPU :class:`torch.Generator`, so
results are reproducible and identical on any device; the image work runs on the batch's device.
For one-channel images the colour steps (saturation, hue, grayscale) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KDGuardError, check_range

#: ITU-R BT.601 luma weights (torchvision's ``rgb_to_grayscale``).
LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _check_float_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KDGuardError(f"{what} needs a float N×C×H×W batch in [0, 1], got {shape}",
                           "convert uint8 images with kdguard.data.to_float first")


def crop_boxes(n: int, height: int, width: int, *, scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10,
               generator: torch.Generator | None = None) -> torch.Tensor:
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
    s = _uniform(n * attempts, lo, hi, generator).view(n, attempts)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, attempts)
    r = log_r.exp()
    w = torch.round(torch.sqrt(area * s * r))
    h = torch.round(torch.sqrt(area * s / r))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    ok = first >= 0
    h_sel = torch.where(ok, h[rows, first.clamp(min=0)], torch.full((n,), float(height)))
    w_sel = torch.where(ok, w[rows, first.clamp(min=0)], torch.full((n,), float(width)))
    top = torch.floor(torch.rand(n, generator=generator) * (height - h_sel + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w_sel + 1))
    return torch.stack([top, left, h_sel, w_sel], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int],
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` (``N×4`` ``(top, left, h, w)`` pixels) out of ``x`` and resize to ``size``.

    Bilinear sampling of the box through one ``affine_grid``/``grid_sample`` call (edge-aligned
    coordinates, ``align_corners=False``), optionally mirrored left–right where ``flip`` (``N``
    bool) is True. ``x`` float ``N×C×H×W`` → float ``N×C×size[0]×size[1]`` on the same device.
    """
    _check_float_batch(x, "resized_crop")
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


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``N×1×H×W`` of an RGB batch ``N×3×H×W`` (BT.601 weights); a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``N×3×H×W`` in [0, 1] → HSV ``N×3×H×W``, all three in [0, 1] (H in turns).

    The hexcone model (Smith 1978): ``V = max``, ``S = (max − min)/max`` (0 where max = 0), H from
    the dominant channel; grey pixels get H = 0.
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV ``N×3×H×W`` (all in [0, 1]) → RGB ``N×3×H×W`` in [0, 1].

    Closed form: channel ``n ∈ {5, 3, 1}`` (R, G, B) is ``V − V·S·clamp(min(k, 4 − k), 0, 1)`` with
    ``k = (n + 6H) mod 6``.
    """
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor·a + (1 − factor)·b`` clipped to [0, 1] (torchvision's ``_blend``); factor ``N``."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:  # contrast: blend with the mean grey level of each image
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), factor)
    if op == 2:  # saturation
        return _blend(x, grayscale(x).expand_as(x), factor)
    hsv = rgb_to_hsv(x)  # hue
    hsv = torch.stack([(hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, *, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1, p: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision-style ``RandomApply([ColorJitter(b, c, s, h)], p)`` on a batch, per image.

    Args:
        x: float ``N×C×H×W`` in [0, 1] (C = 1: only brightness and contrast apply).
        brightness, contrast, saturation: strengths ``a ≥ 0``; factors ``~ U[max(0, 1−a), 1+a]``.
        hue: strength in ``[0, 0.5]``; shift ``~ U[−hue, hue]`` turns.
        p: probability that an image is jittered at all.
        generator: CPU generator for the random factors and the per-image order of the four ops.

    Returns:
        A new float ``N×C×H×W`` batch in [0, 1].

    Raises:
        KDGuardError: a negative strength, ``hue`` outside [0, 0.5] or ``p`` outside [0, 1].
    """
    _check_float_batch(x, "color_jitter")
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise KDGuardError(f"color jitter {name} {v!r} is negative", "give a strength >= 0, e.g. 0.4")
    check_range("color jitter hue", hue, 0.0, 0.5)
    check_range("color jitter probability", p, 0.0, 1.0)
    n = x.shape[0]
    apply = torch.rand(n, generator=generator) < p
    strengths = (brightness, contrast, saturation)
    factors = [_uniform(n, max(0.0, 1 - a), 1 + a, generator) for a in strengths]
    factors.append(_uniform(n, -hue, hue, generator))
    identity = (1.0, 1.0, 1.0, 0.0)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # a random permutation per image
    ops = (0, 1) if x.shape[1] == 1 else (0, 1, 2, 3)
    out = x.float()
    for step in range(4):
        for op in ops:
            # images whose op at this step is `op`; the others get the identity factor
            chosen = (order[:, step] == op) & apply
            if not chosen.any():
                continue
            if op == 3:  # the HSV round trip is the costly one: only on the chosen images
                idx = chosen.nonzero().squeeze(1).to(x.device)
                out = out.index_copy(0, idx, _jitter_op(out[idx], op, factors[op][chosen].to(x.device)))
            else:  # blends are cheap elementwise ops: run them on the whole batch
                f = torch.where(chosen, factors[op], torch.full_like(factors[op], identity[op]))
                out = _jitter_op(out, op, f.to(x.device))
    return out if out is not x else x.clone()


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each RGB image by its luma in all channels with probability ``p`` (C = 1: unchanged)."""
    _check_float_batch(x, "random_grayscale")
    check_range("grayscale probability", p, 0.0, 1.0)
    chosen = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    if x.shape[1] == 1:
        return x.clone()
    return torch.where(chosen.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


@dataclass(frozen=True)
class SimCLRAugment:
    """One random SimCLR view of every image of a batch.

    Args:
        size: output ``(H, W)``; ``None`` keeps the input size.
        crop: apply the random resized crop (False: only resize to ``size``, e.g. BadEncoder's
            reference-image augmentation ``finetune_transform``, which has no crop).
        scale, ratio: crop area fraction and aspect-ratio ranges (torchvision defaults).
        hflip: random horizontal flips (p = 0.5).
        brightness, contrast, saturation, hue, jitter_p: colour jitter (0.4, 0.4, 0.4, 0.1, 0.8).
        gray_p: random grayscale probability (0.2).

    Call: ``aug(x, generator)`` with ``x`` uint8 (0–255) or float ([0, 1]) ``N×C×H×W`` on any
    device → float ``N×C×H'×W'`` in [0, 1] on that device.

    Raises:
        KDGuardError: bad ranges (on call), or ``x`` not a 4-D uint8/float tensor.
    """

    size: tuple[int, int] | None = None
    crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        _check_float_batch(x, "SimCLR augmentation")
        n, _, height, width = x.shape
        size = self.size or (height, width)
        if self.crop:
            boxes = crop_boxes(n, height, width, scale=self.scale, ratio=self.ratio, generator=generator)
        else:
            boxes = torch.tensor([[0.0, 0.0, float(height), float(width)]]).expand(n, 4)
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else None
        if self.crop or flip is not None or tuple(size) != (height, width):
            out = resized_crop(x, boxes, size, flip)
        else:
            out = x.float().clone()
        out = color_jitter(out, brightness=self.brightness, contrast=self.contrast,
                           saturation=self.saturation, hue=self.hue, p=self.jitter_p, generator=generator)
        return random_grayscale(out, self.gray_p, generator)
