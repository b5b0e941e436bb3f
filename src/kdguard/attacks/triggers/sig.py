"""SIG: the sinusoidal-signal trigger of Barni, Kallas and Tondi, "A new backdoor attack in CNNs by
training set corruption without label poisoning" (ICIP 2019). A clean-label trigger: it is meant to
be added to target-class training images whose labels stay unchanged (see ``poison.py``)."""

from __future__ import annotations

import math

import torch

from .base import Trigger, register_trigger
from .validate import as_choice, as_float


@register_trigger("sig")
class SIG(Trigger):
    """Horizontal sinusoid ``v(i, j) = delta · sin(2π · j · frequency / W)``, same on every row and
    channel (``j`` = column index, values on the 0–255 scale).

    Two forms:

    * ``mode="additive"`` (default, Barni et al. 2019, sinusoidal signal): ``x' = clip(x + v)``
      with ``delta = 20`` and ``frequency = 6`` (the paper's training signal).
    * ``mode="blend"``: the ABD reference code's form, ``x' = (1 − alpha)·x + alpha·P`` with
      ``alpha = 0.2`` and ``P`` the sinusoid stored as an 8-bit image. In the reference asset
      (Trap-and-Replace ``triggers/sig.png``) the negative half-waves were cast to uint8 with
      wrap-around (−1 → 255, −19 → 237), which makes the pattern a high-contrast stripe image
      with values near 0–20 and 236–255 rather than a faint sinusoid; kdguard reproduces that
      construction: ``P = (trunc(v) mod 256) / 255``. The asset's period (≈ 7.8 px) also differs
      from ``W / frequency`` = 5.3 px for the defaults: on 32 px, ``frequency=4.08`` reproduces
      the asset to within one grey level.

    Args:
        image_shape: ``(C, H, W)``.
        seed: recorded for uniformity; the pattern is not random.
        delta: amplitude on the 0–255 scale, in [0, 255].
        frequency: number of periods across the image width, > 0.
        mode: ``"additive"`` or ``"blend"``.
        alpha: blend weight in (0, 1] (used by ``mode="blend"`` only).

    Raises:
        KDGuardError: a parameter out of range or an unknown mode.
    """

    MODES = ("additive", "blend")

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, delta: float = 20.0,
                 frequency: float = 6.0, mode: str = "additive", alpha: float = 0.2) -> None:
        super().__init__(image_shape, seed)
        self.delta = as_float(self.name, "delta", delta, 0.0, 255.0)
        self.frequency = as_float(self.name, "frequency", frequency, 0.0, math.inf,
                                  low_open=True)
        self.mode = as_choice(self.name, "mode", mode, self.MODES)
        self.alpha = as_float(self.name, "alpha", alpha, 0.0, 1.0, low_open=True)
        cols = torch.arange(self.width, dtype=torch.float64)
        signal = self.delta * torch.sin(2 * math.pi * cols * self.frequency / self.width)
        if self.mode == "blend":
            signal = torch.remainder(torch.trunc(signal), 256.0)
        row = (signal / 255.0).to(torch.float32)
        self._signal = row.view(1, 1, -1).expand(self.channels, self.height, -1).contiguous()

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W``: the signed offset ``v/255`` (additive) or the blended image
        ``P`` in [0, 1] (blend)."""
        return self._signal.clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        signal = self._on("signal", self._signal, x)
        if self.mode == "additive":
            return x + signal
        return (1.0 - self.alpha) * x + self.alpha * signal
