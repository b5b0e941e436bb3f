"""Data for the SSL track: pre-training subsets, the defender's clean subset and downstream sets
brought to the encoder's input format.

An encoder reads images of one shape ``(C, H, W)`` (its pre-training data's, e.g. 3×32×32 for
CIFAR-10). A downstream dataset of another shape is converted once, as BadEncoder's evaluation
does for MNIST-like data (Jia et al., S&P 2022): resized with bilinear interpolation (antialiased
when shrinking) to ``H×W``, grey images repeated to 3 channels (colour images turned into BT.601
luma for a 1-channel encoder). Triggers are applied after this conversion, on what the encoder sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..data import ImageDataset, load_dataset
from ..errors import KDGuardError, check_range
from ..augment import LUMA


def to_encoder_input(images: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Convert uint8 images ``N×C×H×W`` to the encoder's ``(C', H', W')``; returns uint8 ``N×C'×H'×W'``.

    Resizing is bilinear (``antialias=True`` when shrinking), values are rounded back to uint8.
    Channels: 1 → 3 by repetition, 3 → 1 by BT.601 luma; equal counts are kept.

    Raises:
        KDGuardError: images not uint8 ``N×C×H×W`` with C ∈ {1, 3}, or a bad ``input_shape``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise KDGuardError(f"images of dtype {images.dtype} and shape {tuple(images.shape)} cannot be "
                           "converted", "pass uint8 N×C×H×W images with 1 or 3 channels")
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise KDGuardError(f"encoder input channels {c} are not 1 or 3", "check the encoder's input_shape")
    x = images
    if tuple(x.shape[2:]) != (h, w):
        shrink = x.shape[2] > h or x.shape[3] > w
        out = []
        for start in range(0, len(x), 4096):  # bounded float memory for large splits
            chunk = x[start:start + 4096].float()
            chunk = F.interpolate(chunk, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
            out.append(chunk.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out) if out else x.new_empty(0, x.shape[1], h, w)
    if x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    elif x.shape[1] == 3 and c == 1:
        weights = torch.tensor(LUMA).view(1, 3, 1, 1)
        x = (x.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return x


def adapt_dataset(ds: ImageDataset, input_shape: Sequence[int]) -> ImageDataset:
    """``ds`` with its images converted by :func:`to_encoder_input` (labels and names kept)."""
    images = to_encoder_input(ds.images, input_shape)
    if images is ds.images:
        return ds
    c = int(input_shape[0])
    mean = ds.mean if len(ds.mean) == c else (sum(ds.mean) / len(ds.mean),) * c
    std = ds.std if len(ds.std) == c else (sum(ds.std) / len(ds.std),) * c
    return replace(ds, images=images, mean=tuple(mean), std=tuple(std))


def random_subset(ds: ImageDataset, count: int | None, seed: int) -> ImageDataset:
    """``count`` images of ``ds`` drawn without replacement (seeded); ``None`` or ≥ len = all of it."""
    if count is None or count >= len(ds):
        return ds
    if count < 1:
        raise KDGuardError(f"subset size {count!r} is below 1", "give a positive number of images or null")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count]
    return ds.subset(idx.sort().values)


def fraction_subset(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """A seeded random ``fraction`` of ``ds`` (at least 2 images) and the chosen indices (sorted).

    Raises:
        KDGuardError: ``fraction`` outside (0, 1].
    """
    check_range("clean fraction", fraction, 0.0, 1.0, low_open=True)
    count = max(2, int(round(fraction * len(ds))))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return ds.subset(idx), idx


def load_split(name: str, split: str, root: str | None, input_shape: Sequence[int] | None = None,
               limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Load a registered dataset split, optionally subsampled and converted to ``input_shape``."""
    ds = random_subset(load_dataset(name, split, root=root), limit, seed)
    return adapt_dataset(ds, input_shape) if input_shape is not None else ds
