"""Blended trigger (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017): ``x' = (1 − α)·x + α·P`` over the whole image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import KDGuardError
from .base import Trigger, register_trigger
from .validate import as_float


#: the seeded patterns of :class:`Blend` (used when no ``pattern`` is given)
BLEND_STYLES = ("noise", "cartoon")


def cartoon_pattern(image_shape: tuple[int, int, int], generator: torch.Generator, *, shapes: int = 7,
                    supersample: int = 4) -> torch.Tensor:
    """A seeded flat-colour "cartoon": filled ellipses with dark outlines on a flat background.

    Stands in for ABD's ``blend.png`` (a cartoon character: flat colour regions and black
    contours), which kdguard does not ship. Drawn at ``supersample`` times the size, then
    downsampled with antialiasing, so edges are smooth as in a resized drawing.

    Args:
        image_shape: ``(C, H, W)``, C = 1 (luminance of the colours) or 3.
        generator: a CPU ``torch.Generator``: the same seed gives the same image.
        shapes: ellipses drawn, later ones over earlier ones.
        supersample: drawing resolution factor (≥ 1).

    Returns:
        ``float32`` ``C×H×W`` in [0, 1].
    """
    c, h, w = image_shape
    big_h, big_w = h * supersample, w * supersample
    ys = torch.linspace(0.0, 1.0, big_h).view(-1, 1)
    xs = torch.linspace(0.0, 1.0, big_w).view(1, -1)

    def uniform(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    image = uniform(0.55, 1.0, 3).view(3, 1, 1).expand(3, big_h, big_w).clone()  # light background
    outline = 0.06  # contour width, as a fraction of each ellipse's radius
    for _ in range(shapes):
        cy, cx = uniform(0.1, 0.9), uniform(0.1, 0.9)
        ry, rx = uniform(0.12, 0.4), uniform(0.12, 0.4)
        d = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        inside = d <= 1.0
        image[:, inside] = uniform(0.0, 1.0, 3).view(3, 1)
        image[:, inside & (d > (1.0 - outline) ** 2)] = 0.05
    image = F.interpolate(image.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False,
                          antialias=True).squeeze(0).clamp(0, 1)
    if c == 1:
        image = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)
    return image.contiguous()


@register_trigger("blend", aliases=("blended",))
class Blend(Trigger):
    """Blend a full-image pattern into every image: ``x' = (1 − alpha)·x + alpha·P``.

    ABD blends ``0.8·x + 0.2·resize(blend.png)`` (a 540×540 cartoon image, not shipped with
    kdguard). kdguard's default ``P`` is a seeded uniform random image (``style="noise"``, Chen
    et al.'s random-pattern blend). ``style="cartoon"`` draws a seeded flat-colour cartoon instead
    (:func:`cartoon_pattern`), the closest stand-in for ABD's image: a noise pattern makes the
    teacher answer the target class on any noise-like image, which data-free synthesis starts
    from (``docs/abd-cifar10.md``). Pass ``pattern`` to use your own image.

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the random pattern (unused when ``pattern`` is given).
        alpha: blend weight in (0, 1], default 0.2 (ABD).
        style: the seeded pattern when ``pattern`` is None: ``"noise"`` (uniform, the default) or
            ``"cartoon"``.
        pattern: None (a seeded pattern of ``style``), a path to an image file (loaded with Pillow, converted to
            RGB or grayscale to match ``C`` and resized to ``H×W`` with Pillow's antialiased
            bilinear filter), or a tensor / nested list ``C×H×W``, ``1×H×W`` or ``H×W`` with float
            values in [0, 1] or integer values in 0–255 (resized bilinearly if ``H×W`` differs).

    Raises:
        KDGuardError: alpha out of range; unknown style; unreadable image file; pattern with a
            wrong shape, channel count or value range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, alpha: float = 0.2,
                 style: str = "noise", pattern: str | Path | torch.Tensor | list | None = None) -> None:
        super().__init__(image_shape, seed)
        self.alpha = as_float(self.name, "alpha", alpha, 0.0, 1.0, low_open=True)
        if style not in BLEND_STYLES:
            raise KDGuardError(f"blend style {style!r} is unknown", f"use one of {', '.join(BLEND_STYLES)}")
        self.style = style
        if pattern is None:
            self._source: Any = None
            self._blend = (cartoon_pattern(self.image_shape, self._generator()) if style == "cartoon"
                           else torch.rand(self.image_shape, generator=self._generator()))
        elif isinstance(pattern, (str, Path)):
            self._source = str(pattern)
            self._blend = self._load_image(Path(pattern))
        else:
            self._blend = self._from_tensor(pattern)
            self._source = self._blend  # recorded as values so params() can rebuild it

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W`` in [0, 1]: the blended image ``P``."""
        return self._blend.clone()

    def _param_values(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "style": self.style, "pattern": self._source}

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alpha) * x + self.alpha * self._on("blend", self._blend, x)

    def _load_image(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        if not path.is_file():
            raise KDGuardError(f"blend pattern file {str(path)!r} does not exist",
                               "give the path of an image file (PNG, JPEG, ...)")
        try:
            with Image.open(path) as img:
                mode = "RGB" if self.channels == 3 else "L"
                img = img.convert(mode).resize((self.width, self.height),
                                               Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise KDGuardError(f"blend pattern file {str(path)!r} is not a readable image "
                               f"({err})", "give a PNG or JPEG file") from None
        data = data.view(self.height, self.width, -1).permute(2, 0, 1).float() / 255.0
        return data.expand(self.channels, -1, -1).contiguous() if data.shape[0] == 1 else data

    def _from_tensor(self, pattern: Any) -> torch.Tensor:
        try:
            p = torch.as_tensor(pattern).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise KDGuardError(f"blend pattern of type {type(pattern).__name__} is not an image",
                               "give a C×H×W tensor, an image path, or None") from None
        if p.dim() == 2:
            p = p.unsqueeze(0)
        if p.dim() != 3 or p.shape[0] not in (1, self.channels) or p.numel() == 0:
            raise KDGuardError(
                f"blend pattern has shape {tuple(p.shape)}, not C×H×W with C in "
                f"{sorted({1, self.channels})}", f"give a {self.channels}×H×W or 1×H×W pattern")
        if p.is_floating_point():
            p = p.float()
            scale = 1.0
        elif p.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
            p, scale = p.float(), 255.0
        else:
            raise KDGuardError(f"blend pattern has dtype {p.dtype}",
                               "give float values in [0, 1] or integer values in 0-255")
        if p.min() < 0 or p.max() > scale:
            raise KDGuardError(f"blend pattern values lie in [{p.min():.3g}, {p.max():.3g}], "
                               f"outside [0, {scale:g}]",
                               "give float values in [0, 1] or integer values in 0-255")
        p = p / scale
        if tuple(p.shape[1:]) != (self.height, self.width):
            p = F.interpolate(p.unsqueeze(0), size=(self.height, self.width), mode="bilinear",
                              align_corners=False, antialias=True).squeeze(0).clamp(0, 1)
        return p.expand(self.channels, -1, -1).contiguous()
