"""The standard CIFAR augmentation on whole ``N×C×H×W`` tensors (CPU or CUDA, uint8 or float).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Sec. 4.2: pad 4 pixels on
each side, take a random crop of the original size, and flip horizontally with probability 0.5.
Every sample gets its own offsets and flip, drawn in one call from ``generator``, so a seeded
:class:`torch.Generator` makes the result reproducible. No Python loop over samples: crops are
two :func:`torch.gather` calls.
"""

from __future__ import annotations

import torch

from ..errors import KDGuardError, check_range
from ._random import check_batch, rand, randint


def _check_padding(padding: int) -> None:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise KDGuardError(f"crop padding {padding!r} is not a non-negative integer",
                           "give the padding in pixels, e.g. 4")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels per side, then crop it back at a random offset.

    Args:
        x: ``N×C×H×W`` tensor, any dtype (uint8 0–255 or float), any device.
        padding: pixels of zero padding per side; offsets are uniform in ``[0, 2·padding]`` for
            rows and columns independently, per sample. ``0`` returns ``x`` unchanged (a copy).
        generator: source of randomness (CPU or on ``x``'s device).

    Returns:
        A new ``N×C×H×W`` tensor, same dtype and device: sample ``i`` is the window
        ``padded[i, :, dy_i:dy_i+H, dx_i:dx_i+W]`` of the zero-padded input.

    Raises:
        KDGuardError: ``x`` is not 4-D or ``padding`` is not a non-negative integer.
    """
    check_batch(x, "random_crop")
    _check_padding(padding)
    if padding == 0:
        return x.clone()
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    dy = randint(n, 2 * padding + 1, generator, x.device)
    dx = randint(n, 2 * padding + 1, generator, x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    band = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    return band.gather(3, cols.expand(n, c, h, w))


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left–right with probability ``p``, independently per sample.

    Args:
        x: ``N×C×H×W`` tensor, any dtype and device.
        p: flip probability in ``[0, 1]``.
        generator: source of randomness (CPU or on ``x``'s device).

    Returns:
        A new ``N×C×H×W`` tensor, same dtype and device.

    Raises:
        KDGuardError: ``x`` is not 4-D or ``p`` is outside ``[0, 1]``.
    """
    check_batch(x, "random_hflip")
    check_range("flip probability", p, 0.0, 1.0)
    flip = rand(x.shape[0], generator, x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class Augment:
    """Random crop (zero padding ``crop_padding``) followed by an optional random flip.

    ``Augment(4, hflip=True)`` is the CIFAR recipe (He et al. 2016, Sec. 4.2);
    ``Augment.for_dataset(ds)`` disables the flip where it would change the label (digits,
    traffic signs: ``ds.hflip`` is False). Call it on a batch:
    ``x_aug = augment(x, generator)`` with ``x`` ``N×C×H×W`` (uint8 or float, any device).
    """

    def __init__(self, crop_padding: int = 4, hflip: bool = True) -> None:
        _check_padding(crop_padding)
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)

    @classmethod
    def for_dataset(cls, dataset, crop_padding: int = 4) -> "Augment":
        """The augmentation suited to an :class:`~kdguard.data.dataset.ImageDataset`."""
        return cls(crop_padding=crop_padding, hflip=dataset.hflip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = random_crop(x, self.crop_padding, generator)
        return random_hflip(out, 0.5, generator) if self.hflip else out

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"
