"""Pixel-replacement triggers: a patch of pixels is overwritten, the rest of the image is kept.

``x' = x·(1 − M) + M·P`` for a mask ``M`` (a rectangle) and a pattern ``P``, as in BadNets (Gu et
al., "BadNets", 2017/2019) and the ``badnet_grid`` / ``badnet_sq`` / ``l0_inv`` triggers of the ABD
reference code (``zskt/datasets/backdoor.py``, illidanlab/ABD).

Positions are ``(row, col)`` of the patch's top-left pixel; negative values count from the
bottom/right edge, so the defaults stay in the same corner for 32×32 (CIFAR-10, GTSRB) and 28×28
(MNIST) images.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import KDGuardError
from .base import Trigger, register_trigger
from .validate import Box, as_choice, as_int, as_pair, resolve_box


class PatchReplaceTrigger(Trigger):
    """Base for triggers that overwrite the pixels of a rectangle with a fixed pattern."""

    def _set_patch(self, box: Box, patch: torch.Tensor) -> None:
        """``patch``: float ``C×h×w`` in [0, 1] written into ``box``."""
        self.box = box
        self._mask = box.mask(self.height, self.width)
        self._pattern = torch.zeros(self.image_shape, dtype=torch.float32)
        self._pattern[:, box.rows, box.cols] = patch
        self._pattern_uint8 = (self._pattern * 255).round().to(torch.uint8)

    @property
    def mask(self) -> torch.Tensor:
        """``bool`` ``1×H×W``: True on the overwritten pixels."""
        return self._mask.clone()

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W`` in [0, 1]: the values written where :attr:`mask` is True."""
        return self._pattern.clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._on("mask", self._mask, x, torch.bool)
        return torch.where(mask, self._on("pattern", self._pattern, x), x)

    def _apply_uint8(self, x: torch.Tensor) -> torch.Tensor:
        # pixel replacement is exact on uint8: skip the float round trip
        mask = self._on("mask", self._mask, x, torch.bool)
        return torch.where(mask, self._on("pattern_uint8", self._pattern_uint8, x), x)


@register_trigger("badnets_grid", aliases=("badnet_grid",))
class BadNetsGrid(PatchReplaceTrigger):
    """BadNets black/white checkerboard patch (default 3×3 in the bottom-right corner).

    Defaults follow ABD's ``badnet_grid``: a 3×3 grid on rows/cols ``H−3..H−1`` (29–31 on 32×32,
    25–27 on 28×28), the same in every channel.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        seed: recorded for uniformity; the pattern is not random.
        size: int or ``(h, w)``, patch size in pixels.
        position: ``(row, col)`` of the top-left pixel; negative = from the bottom/right.
        variant: ``"checkerboard"`` (default): alternating cells with a white bottom-right cell,
            as the BadNets paper describes. ``"abd"``: the ABD reference code's grid, which is the
            same checkerboard with its top-left cell black (for 3×3: rows
            ``[0,0,255], [0,255,0], [255,0,255]``), i.e. one cell breaks the alternation.

    Raises:
        KDGuardError: patch larger than the image, position outside it, unknown variant.
    """

    VARIANTS = ("checkerboard", "abd")

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 size: int | tuple[int, int] = 3, position: tuple[int, int] = (-3, -3),
                 variant: str = "checkerboard") -> None:
        super().__init__(image_shape, seed)
        box = resolve_box(self.name, size, position, self.image_shape)
        self.size, self.position = (box.height, box.width), as_pair(self.name, "position", position)
        self.variant = as_choice(self.name, "variant", variant, self.VARIANTS)
        rows = torch.arange(box.height).view(-1, 1)
        cols = torch.arange(box.width).view(1, -1)
        # parity counted from the bottom-right cell, which is white
        cells = (((box.height - 1 - rows) + (box.width - 1 - cols)) % 2 == 0).float()
        if self.variant == "abd":
            cells[0, 0] = 0.0
        self._set_patch(box, cells.expand(self.channels, -1, -1))


@register_trigger("badnets_square", aliases=("badnet_sq", "badnets_sq"))
class BadNetsSquare(PatchReplaceTrigger):
    """A solid square (default white 4×4), one pixel from the bottom-right corner.

    Defaults follow ABD's ``badnet_sq``: rows/cols ``H−5..H−2`` (27–30 on 32×32, 23–26 on 28×28).

    Args:
        image_shape: ``(C, H, W)``.
        seed: recorded for uniformity; the pattern is not random.
        size: int or ``(h, w)``.
        position: ``(row, col)`` of the top-left pixel; negative = from the bottom/right.
        color: 0–255, one int for all channels or one per channel.

    Raises:
        KDGuardError: patch larger than the image, position outside it, bad colour.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 size: int | tuple[int, int] = 4, position: tuple[int, int] = (-5, -5),
                 color: int | tuple[int, ...] = 255) -> None:
        super().__init__(image_shape, seed)
        box = resolve_box(self.name, size, position, self.image_shape)
        self.size, self.position = (box.height, box.width), as_pair(self.name, "position", position)
        self.color = _color(self.name, color, self.channels)
        per_channel = self.color if isinstance(self.color, tuple) else (self.color,) * self.channels
        values = torch.tensor(per_channel, dtype=torch.float32).view(-1, 1, 1) / 255.0
        self._set_patch(box, values.expand(-1, box.height, box.width))


@register_trigger("l0_inv")
class L0Invisible(PatchReplaceTrigger):
    """ABD's ``l0_inv``: a few pixels (default 9 on the bottom row) replaced by a binary pattern.

    ``x' = x·(1 − M) + t``. In the reference assets (Trap-and-Replace ``triggers/mask.npy`` and
    ``l0_inv.png``) M covers row 31, cols 23–31 of a 32×32 image in all channels and ``t`` is 0 or
    255 per pixel and channel. kdguard regenerates ``t`` as seeded random 0/255 values per pixel
    and channel on the same 1×9 strip (``position=(-1, -9)``), since the PNG is not shipped.

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the binary pattern.
        size: int or ``(h, w)``, default ``(1, 9)``.
        position: ``(row, col)``; default ``(-1, -9)`` (bottom row, last 9 columns).

    Raises:
        KDGuardError: patch larger than the image or outside it.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 size: int | tuple[int, int] = (1, 9),
                 position: tuple[int, int] = (-1, -9)) -> None:
        super().__init__(image_shape, seed)
        box = resolve_box(self.name, size, position, self.image_shape)
        self.size, self.position = (box.height, box.width), as_pair(self.name, "position", position)
        bits = torch.randint(0, 2, (self.channels, box.height, box.width),
                             generator=self._generator())
        self._set_patch(box, bits.float())


def _color(owner: str, color: Any, channels: int) -> int | tuple[int, ...]:
    if isinstance(color, (list, tuple)):
        if len(color) != channels:
            raise KDGuardError(f"{owner} color {color!r} has {len(color)} values for "
                               f"{channels}-channel images",
                               f"give one 0-255 value or {channels} values")
        return tuple(as_int(owner, "color", c, 0, 255) for c in color)
    return as_int(owner, "color", color, 0, 255)
