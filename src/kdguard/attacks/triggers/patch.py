"""Pixel-replacement triggers: a patch of pixels is overwritten, the rest of the image is kept.

``x' = x·(1 − M) + M·P`` for a mask ``M`` (a rectangle) and a pattern ``P``, as in BadNets (Gu et
al., "BadNets", 2017/2019) and the ``badnet_grid`` / ``badnet_sq`` / ``l0_inv`` triggers of the ABD
reference code (``zskt/datasets/backdoor.py``, illidanlab/ABD). The ``patch`` trigger
(:class:`FilePatch`) reads ``P`` and ``M`` from the user's files, as BackdoorBench's
``patch_mask_path`` does, for a teacher whose trigger the user knows.

Positions are ``(row, col)`` of the patch's top-left pixel; negative values count from the
bottom/right edge, so the defaults stay in the same corner for 32×32 (CIFAR-10, GTSRB) and 28×28
(MNIST) images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import KDGuardError
from .base import Trigger, register_trigger
from .files import check_sha256, read_trigger_file
from .validate import Box, as_choice, as_float, as_int, as_pair, resolve_box


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


@register_trigger("patch")
class FilePatch(Trigger):
    """A pattern read from an image or array file, pasted or blended into a rectangle.

    ``x' = x + α·M·(P − x)`` on the rectangle the pattern covers, ``x`` elsewhere: with ``α = 1``
    and a 0/1 mask the masked pixels are replaced (BadNets), with ``α < 1`` or a soft mask they
    are blended. This is BackdoorBench's ``patch_mask_path`` trigger (pattern image plus mask
    image) with a position and a blend weight added.

    Files: PNG/JPEG (Pillow) or ``.npy`` (``np.load(allow_pickle=False)``), ``H×W`` or ``H×W×C``
    (channels last), ``uint8`` 0–255 or float 0–1 (see :func:`~.files.read_trigger_file`).
    A grey pattern is used in every channel. :meth:`params` records the absolute paths and the
    sha256 of each file; a rebuild from those parameters refuses a file that changed since.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        seed: recorded for uniformity; the pattern is not random.
        pattern_file: the pattern ``P``, at most ``H×W``, 1 or ``C`` channels.
        mask_file: the mask ``M``, same ``h×w`` as the pattern, 1 or ``C`` channels, values in
            [0, 1] (1 = trigger pixel); None (default): all ones over the pattern.
        position: ``(row, col)`` of the pattern's top-left pixel; negative = from the
            bottom/right (as the other patch triggers). None (default): the bottom-right corner,
            which is ``(0, 0)`` for a pattern of the image's size.
        alpha: blend weight in (0, 1]; 1 (default) pastes.
        pattern_sha256, mask_sha256: digests recorded by :meth:`params`; when given, the file
            must still have that digest.

    Raises:
        KDGuardError: no pattern file; a missing, unreadable or changed file; NaN or values
            outside [0, 1]; a pattern larger than the image or with another channel count; a
            mask of another size or selecting no pixel; a position that puts the pattern
            outside the image; alpha outside (0, 1].
    """

    #: parameters that a run manifest's trigger record holds exactly (resolved paths, digests)
    file_params: ClassVar[tuple[str, ...]] = ("pattern_file", "pattern_sha256", "mask_file", "mask_sha256")

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 pattern_file: str | None = None, mask_file: str | None = None,
                 position: tuple[int, int] | None = None, alpha: float = 1.0,
                 pattern_sha256: str | None = None, mask_sha256: str | None = None) -> None:
        super().__init__(image_shape, seed)
        if pattern_file is None:
            raise KDGuardError("trigger 'patch' needs a pattern file",
                               "give attack.params.pattern_file=PATH (a .png, .jpg or .npy file)")
        self.alpha = as_float(self.name, "alpha", alpha, 0.0, 1.0, low_open=True)
        pattern = read_trigger_file(self.name, "pattern_file", pattern_file, mask=False,
                                    channels=self.channels,
                                    expected_sha256=check_sha256(self.name, "pattern_sha256", pattern_sha256))
        p = self._channels("pattern_file", pattern.path, pattern.array)
        h, w = p.shape[1:]
        if h > self.height or w > self.width:
            raise KDGuardError(
                f"patch pattern_file {pattern.path!r} is {h}×{w} but the images are "
                f"{self.height}×{self.width}", f"crop or resize attack.params.pattern_file to at "
                f"most {self.height}×{self.width}")
        if mask_file is None:
            if mask_sha256 is not None:
                raise KDGuardError("patch mask_sha256 is given without a mask_file",
                                   "give attack.params.mask_file too, or drop attack.params.mask_sha256")
            m = torch.ones(1, h, w)
            self.mask_file, self.mask_sha256 = None, None
        else:
            mask = read_trigger_file(self.name, "mask_file", mask_file, mask=True, channels=self.channels,
                                     expected_sha256=check_sha256(self.name, "mask_sha256", mask_sha256))
            m = self._channels("mask_file", mask.path, mask.array)
            if tuple(m.shape[1:]) != (h, w):
                raise KDGuardError(
                    f"patch mask_file {mask.path!r} is {m.shape[1]}×{m.shape[2]} but the pattern is "
                    f"{h}×{w}", "give attack.params.mask_file the size of attack.params.pattern_file")
            if not bool((m > 0).any()):
                raise KDGuardError(f"patch mask_file {mask.path!r} selects no pixel (all zeros)",
                                   "give attack.params.mask_file with 1 (or > 0) on the trigger's pixels")
            self.mask_file, self.mask_sha256 = mask.path, mask.sha256
        self.pattern_file, self.pattern_sha256 = pattern.path, pattern.sha256
        full = h == self.height and w == self.width
        if position is None:
            position = (0, 0) if full else (-h, -w)
        box = resolve_box(self.name, (h, w), position, self.image_shape)
        self.position = (box.row, box.col)
        self._pattern = torch.zeros(self.image_shape, dtype=torch.float32)
        self._pattern[:, box.rows, box.cols] = p
        self._weight = torch.zeros(m.shape[0], self.height, self.width, dtype=torch.float32)
        self._weight[:, box.rows, box.cols] = self.alpha * m
        self._mask = (self._weight > 0).any(0, keepdim=True)
        # α = 1 with a 0/1 mask replaces pixels: exact on uint8, no float round trip
        self._replace = bool(((self._weight == 0) | (self._weight == 1)).all())
        self._pattern_uint8 = (self._pattern * 255).round().to(torch.uint8)

    def _channels(self, key: str, path: str, array: np.ndarray) -> torch.Tensor:
        """``H×W×c`` array → ``c×H×W`` tensor, ``c`` being 1 or the images' channel count."""
        c = array.shape[2]
        if c not in (1, self.channels):
            raise KDGuardError(
                f"patch {key} {path!r} has {c} channels but the images have {self.channels}",
                f"give attack.params.{key} 1 or {self.channels} channels (H×W or "
                f"H×W×{self.channels}, channels last)")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()

    @property
    def mask(self) -> torch.Tensor:
        """``bool`` ``1×H×W``: True where the trigger changes some channel."""
        return self._mask.clone()

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W`` in [0, 1]: the pattern placed in the image (0 outside it)."""
        return self._pattern.clone()

    @property
    def weight(self) -> torch.Tensor:
        """``float32`` ``1×H×W`` or ``C×H×W`` in [0, 1]: ``α·M`` placed in the image."""
        return self._weight.clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._on("weight", self._weight, x)
        return x + weight * (self._on("pattern", self._pattern, x) - x)

    def _apply_uint8(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self._replace:
            return None
        replace = self._on("weight", self._weight, x, torch.bool)
        return torch.where(replace, self._on("pattern_uint8", self._pattern_uint8, x), x)


def _color(owner: str, color: Any, channels: int) -> int | tuple[int, ...]:
    if isinstance(color, (list, tuple)):
        if len(color) != channels:
            raise KDGuardError(f"{owner} color {color!r} has {len(color)} values for "
                               f"{channels}-channel images",
                               f"give one 0-255 value or {channels} values")
        return tuple(as_int(owner, "color", c, 0, 255) for c in color)
    return as_int(owner, "color", color, 0, 255)
