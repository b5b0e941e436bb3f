"""Additive triggers: ``x' = clip(x + t)`` for a fixed, seeded, non-negative pattern ``t``.

These regenerate the Trojan-style and ``l2_inv`` triggers that the ABD reference code
(``zskt/datasets/backdoor.py``, illidanlab/ABD) loads as PNG files from the Trap-and-Replace
repository (``VITA-Group/Trap-and-Replace-Backdoor-Defense/triggers``). The PNGs are not shipped
with kdguard; each pattern here keeps the reference asset's footprint (where it is non-zero) and
value range, with values drawn from a seeded generator. The originals were obtained differently
(TrojanNN patches are optimised against a model, Liu et al., NDSS 2018), so a kdguard Trojan
trigger is a random patch of the same size and place, not the same pattern.
"""

from __future__ import annotations

import torch

from .base import Trigger, register_trigger
from .validate import as_float, as_int, as_pair, resolve_box


class AdditiveTrigger(Trigger):
    """Base for triggers that add a fixed offset pattern to the image, then clip."""

    def _set_offset(self, offset: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``offset``: float ``C×H×W`` on the 0–1 scale; ``mask``: bool ``1×H×W`` or None."""
        self._offset = offset.to(torch.float32)
        self._mask = mask

    @property
    def mask(self) -> torch.Tensor | None:
        """``bool`` ``1×H×W``: pixels where the offset may be non-zero (None = whole image)."""
        return None if self._mask is None else self._mask.clone()

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W``: the offset added to images in the 0–1 scale."""
        return self._offset.clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._on("offset", self._offset, x)


class TrojanPatch(AdditiveTrigger):
    """A seeded random patch added to a rectangle: ``x' = clip(x + t)``.

    ``t`` holds independent uniform integers in ``[0, amplitude]`` (0–255 scale) per pixel and
    channel inside the patch, zero elsewhere. The reference PNGs have this footprint and range
    (``trojan_3x3.png``: values 0–250; ``trojan_8x8.png``: 0–255), so the default amplitude is 255.
    """

    default_size: int = 3
    default_position: tuple[int, int] = (-7, -7)

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 size: int | tuple[int, int] | None = None,
                 position: tuple[int, int] | None = None, amplitude: int = 255) -> None:
        super().__init__(image_shape, seed)
        size = self.default_size if size is None else size
        position = self.default_position if position is None else position
        box = resolve_box(self.name, size, position, self.image_shape)
        self.size = (box.height, box.width)
        self.position = as_pair(self.name, "position", position)
        self.amplitude = as_int(self.name, "amplitude", amplitude, 1, 255)
        self.box = box
        values = torch.randint(0, self.amplitude + 1, (self.channels, box.height, box.width),
                               generator=self._generator())
        offset = torch.zeros(self.image_shape)
        offset[:, box.rows, box.cols] = values.float() / 255.0
        self._set_offset(offset, box.mask(self.height, self.width))


@register_trigger("trojan_3x3")
class Trojan3x3(TrojanPatch):
    """ABD's ``trojan_3x3``: a 3×3 additive patch at rows/cols 25–27 of a 32×32 image.

    Default ``position=(-7, -7)`` keeps the same offset from the bottom-right corner on other
    sizes (rows/cols 21–23 on 28×28). Args and errors as :class:`TrojanPatch`: ``size`` (int or
    ``(h, w)``), ``position`` (``(row, col)``, negative = from the bottom/right), ``amplitude``
    (1–255). Raises KDGuardError for a patch larger than or outside the image.
    """

    default_size = 3
    default_position = (-7, -7)


@register_trigger("trojan_8x8")
class Trojan8x8(TrojanPatch):
    """ABD's ``trojan_8x8``: despite its name a **9×9** additive patch, rows/cols 21–29 of 32×32.

    Default ``position=(-11, -11)`` (rows/cols 17–25 on 28×28). Args and errors as
    :class:`TrojanPatch`.
    """

    default_size = 9
    default_position = (-11, -11)


@register_trigger("trojan_wm")
class TrojanWatermark(AdditiveTrigger):
    """ABD's ``trojan_wm``: a sparse additive watermark over most of the image.

    The reference ``trojan_wm.png`` is non-zero on 321 of the 900 pixels of rows/cols 0–29 of a
    32×32 image (a drawn shape). kdguard picks ``round(density · h · w)`` pixels of the region at
    random (seeded; default density 321/900, i.e. 321 pixels on 32×32) and gives each channel of
    each chosen pixel a uniform integer in ``[1, amplitude]`` (0–255 scale).

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the pixel choice and values.
        size: region size, default ``(H − 2, W − 2)`` (30×30 on 32×32).
        position: region top-left ``(row, col)``, default ``(0, 0)``.
        density: fraction of region pixels in the watermark, in (0, 1].
        amplitude: 1–255, the largest added value.

    Raises:
        KDGuardError: region larger than or outside the image, density or amplitude out of range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 size: int | tuple[int, int] | None = None, position: tuple[int, int] = (0, 0),
                 density: float = 321 / 900, amplitude: int = 255) -> None:
        super().__init__(image_shape, seed)
        if size is None:
            size = (max(1, self.height - 2), max(1, self.width - 2))
        box = resolve_box(self.name, size, position, self.image_shape)
        self.size = (box.height, box.width)
        self.position = as_pair(self.name, "position", position)
        self.density = as_float(self.name, "density", density, 0.0, 1.0, low_open=True)
        self.amplitude = as_int(self.name, "amplitude", amplitude, 1, 255)
        gen = self._generator()
        n_pixels = max(1, round(self.density * box.height * box.width))
        chosen = torch.randperm(box.height * box.width, generator=gen)[:n_pixels]
        region_mask = torch.zeros(box.height * box.width, dtype=torch.bool)
        region_mask[chosen] = True
        region_mask = region_mask.view(1, box.height, box.width)
        values = torch.randint(1, self.amplitude + 1, (self.channels, box.height, box.width),
                               generator=gen).float() / 255.0
        offset = torch.zeros(self.image_shape)
        offset[:, box.rows, box.cols] = values * region_mask
        mask = torch.zeros(1, self.height, self.width, dtype=torch.bool)
        mask[:, box.rows, box.cols] = region_mask
        self._set_offset(offset, mask)


@register_trigger("l2_inv")
class L2Invisible(AdditiveTrigger):
    """ABD's ``l2_inv``: a dense, low-amplitude additive pattern (max 68/255).

    The reference ``l2_inv.png`` is non-negative, covers the whole image, peaks at 68 and is
    mostly small (mean ≈ 9). kdguard draws ``|N(0, 1)|`` per pixel and channel (seeded) and
    rescales it so its maximum is exactly ``amplitude``/255: a half-normal pattern with the same
    peak and a similar skew towards small values.

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the pattern.
        amplitude: 1–255, the pattern's maximum on the 0–255 scale (default 68).

    Raises:
        KDGuardError: amplitude out of range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 amplitude: int = 68) -> None:
        super().__init__(image_shape, seed)
        self.amplitude = as_int(self.name, "amplitude", amplitude, 1, 255)
        noise = torch.randn(self.image_shape, generator=self._generator()).abs()
        self._set_offset(noise / noise.max() * (self.amplitude / 255.0), None)

