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

from dataclasses import dataclass

import torch

from ._random import check_batch, rand
from .color import color_jitter, random_grayscale
from .geometric import crop_boxes, resized_crop


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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        check_batch(x, "SimCLR augmentation", floating=True)
        n, _, height, width = x.shape
        size = self.size or (height, width)
        if self.crop:
            boxes = crop_boxes(n, height, width, scale=self.scale, ratio=self.ratio, generator=generator)
        else:
            boxes = torch.tensor([[0.0, 0.0, float(height), float(width)]]).expand(n, 4)
        flip = rand(n, generator) < 0.5 if self.hflip else None
        if self.crop or flip is not None or tuple(size) != (height, width):
            out = resized_crop(x, boxes, size, flip)
        else:
            out = x.float().clone()
        out = color_jitter(out, brightness=self.brightness, contrast=self.contrast,
                           saturation=self.saturation, hue=self.hue, p=self.jitter_p, generator=generator)
        return random_grayscale(out, self.gray_p, generator)
