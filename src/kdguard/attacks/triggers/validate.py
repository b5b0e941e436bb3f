"""Parameter checks shared by the triggers: each failure is a one-line :class:`KDGuardError`.

``owner`` is the trigger name, so a message reads e.g. ``badnets_grid size -1 ...``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import KDGuardError


def as_int(owner: str, name: str, value: Any, low: int | None = None,
           high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``; integral floats (``3.0``) are accepted."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise KDGuardError(f"{owner} {name} {value!r} is not an integer", f"give {name} as an int")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise KDGuardError(f"{owner} {name} {value!r} is outside {bounds}",
                           f"give an integer {name} in {bounds}")
    return value


def as_float(owner: str, name: str, value: Any, low: float, high: float, *,
             low_open: bool = False) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KDGuardError(f"{owner} {name} {value!r} is not a finite number",
                           f"give {name} as a number")
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise KDGuardError(f"{owner} {name} {value!r} is outside {bounds}",
                           f"give {name} in {bounds}")
    return value


def as_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise KDGuardError(f"{owner} {name} {value!r} is not supported",
                           f"choose one of: {', '.join(choices)}")
    return value


def as_pair(owner: str, name: str, value: Any, low: int | None = None) -> tuple[int, int]:
    """An int ``n`` → ``(n, n)``; a 2-sequence of ints → a tuple (used for sizes and positions)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise KDGuardError(f"{owner} {name} {value!r} is not an int or a (row, col) pair",
                           f"give {name} as an int or two ints, e.g. (3, 3)")
    return as_int(owner, name, value[0], low), as_int(owner, name, value[1], low)


def as_image_shape(value: Any) -> tuple[int, int, int]:
    """Validate ``image_shape = (C, H, W)``: three positive ints."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise KDGuardError(f"trigger image_shape {value!r} is not (C, H, W)",
                           "give three ints, e.g. build_trigger(name, image_shape=(3, 32, 32)) (dataset.shape)")
    c, h, w = (as_int("trigger", "image_shape", v, 1) for v in value)
    return c, h, w


@dataclass(frozen=True)
class Box:
    """A rectangle of pixels: top-left ``(row, col)`` and ``height × width``, inside the image."""

    row: int
    col: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row, self.row + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col, self.col + self.width)

    def mask(self, height: int, width: int) -> torch.Tensor:
        """``bool`` tensor ``1×H×W``, True inside the box."""
        m = torch.zeros(1, height, width, dtype=torch.bool)
        m[:, self.rows, self.cols] = True
        return m


def resolve_box(owner: str, size: Any, position: Any, image_shape: tuple[int, int, int]) -> Box:
    """Place a ``size`` patch at ``position = (row, col)`` of its top-left pixel.

    Negative coordinates count from the bottom/right edge: ``row = -3`` starts at ``H - 3``, so
    ``size=3, position=(-3, -3)`` is the bottom-right corner for any image size.

    Raises:
        KDGuardError: size not positive or larger than the image; the patch leaves the image.
    """
    _, h_img, w_img = image_shape
    h, w = as_pair(owner, "size", size, low=1)
    if h > h_img or w > w_img:
        raise KDGuardError(f"{owner} size {h}×{w} is larger than the {h_img}×{w_img} image",
                           f"give a size of at most ({h_img}, {w_img})")
    r_in, c_in = as_pair(owner, "position", position)
    r = r_in + h_img if r_in < 0 else r_in
    c = c_in + w_img if c_in < 0 else c_in
    if not (0 <= r <= h_img - h and 0 <= c <= w_img - w):
        raise KDGuardError(
            f"{owner} position {(r_in, c_in)} puts its {h}×{w} patch at rows {r}..{r + h - 1}, "
            f"cols {c}..{c + w - 1}, outside the {h_img}×{w_img} image",
            f"give 0 <= row <= {h_img - h} and 0 <= col <= {w_img - w}, or negative values "
            f"counted from the bottom/right, e.g. ({-h}, {-w}) for the bottom-right corner")
    return Box(r, c, h, w)
