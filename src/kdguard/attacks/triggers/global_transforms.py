"""Full-image triggers that look like natural global changes: a colour filter and a smooth,
low-frequency pattern. Both touch every pixel a little instead of a few pixels a lot, the kind of
trigger that survives clean-data distillation and that patch-oriented trigger reconstruction
(Neural Cleanse) struggles to recover.
"""

from __future__ import annotations

import torch

from ...errors import KDGuardError
from .additive import AdditiveTrigger
from .base import Trigger, register_trigger
from .validate import as_choice, as_float, as_int

# Sepia toning (the usual RGB → sepia matrix of image editors); rows give R', G', B'
_SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))
# A warm "Kelvin-like" cast: red up, blue down, a slight green lift
_WARM = ((1.15, 0.05, 0.0), (0.0, 1.02, 0.0), (0.0, 0.0, 0.80))


@register_trigger("color_filter")
class ColorFilter(Trigger):
    """A photo filter as a trigger: ``x' = clip((1 − s)·x + s·(clip(M·x + b))^γ)`` per pixel.

    Filter triggers are Instagram-style global colour transforms (Liu et al., "ABS: Scanning
    neural networks for back-doors by artificial brain stimulation", CCS 2019, §6, filter
    triggers). ``M`` mixes the colour channels of each pixel, ``b`` shifts them, ``γ`` is a tone
    curve and ``s`` blends the filtered image with the original.

    Styles (``M``, ``b``):

    * ``"sepia"`` (default on 3 channels): the usual sepia-toning matrix, ``b = 0``;
    * ``"warm"``: red up 15 %, blue down 20 % (a Kelvin-like cast), ``b = 0``;
    * ``"tone"`` (default on other channel counts): ``M = I``, ``b = 0``: only the tone curve,
      brightening for ``γ < 1``;
    * ``"random"``: ``M = I + 0.25·G`` and ``b = 0.05·g`` with ``G`` (``C×C``) and ``g`` (``C``)
      standard normal draws from the seed (the one seeded style).

    Args:
        image_shape: ``(C, H, W)``; ``sepia`` and ``warm`` need ``C = 3``.
        seed: draws the ``random`` style's matrix; ignored by the others.
        style: one of the styles above; None picks ``sepia`` for 3 channels, else ``tone``.
        strength: ``s`` in (0, 1], default 1 (the filtered image itself).
        gamma: ``γ`` in [0.1, 10], default 1 for sepia/warm/random and 0.6 for tone.

    Raises:
        KDGuardError: an unknown style, ``sepia``/``warm`` on images without 3 channels, or a
            value out of range.
    """

    STYLES = ("sepia", "warm", "tone", "random")

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, style: str | None = None,
                 strength: float = 1.0, gamma: float | None = None) -> None:
        super().__init__(image_shape, seed)
        if style is None:
            style = "sepia" if self.channels == 3 else "tone"
        self.style = as_choice(self.name, "style", style, self.STYLES)
        if self.style in ("sepia", "warm") and self.channels != 3:
            raise KDGuardError(f"{self.name} style {self.style!r} needs 3 colour channels, the images "
                               f"have {self.channels}", "use the tone or random style (attack.params.style=tone)")
        self.strength = as_float(self.name, "strength", strength, 0.0, 1.0, low_open=True)
        if gamma is None:
            gamma = 0.6 if self.style == "tone" else 1.0
        self.gamma = as_float(self.name, "gamma", gamma, 0.1, 10.0)
        c = self.channels
        if self.style == "random":
            g = self._generator()
            matrix = torch.eye(c) + 0.25 * torch.randn(c, c, generator=g)
            bias = 0.05 * torch.randn(c, generator=g)
        else:
            matrix = torch.tensor(_SEPIA if self.style == "sepia" else _WARM) if self.style != "tone" \
                else torch.eye(c)
            bias = torch.zeros(c)
        self._matrix = matrix.to(torch.float32)
        self._bias = bias.to(torch.float32).view(c, 1, 1)

    @property
    def matrix(self) -> torch.Tensor:
        """``float32`` ``C×C``: the colour matrix ``M`` (row ``d`` gives output channel ``d``)."""
        return self._matrix.clone()

    @property
    def bias(self) -> torch.Tensor:
        """``float32`` ``C``: the shift ``b`` on the 0–1 scale."""
        return self._bias.view(-1).clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self._on("matrix", self._matrix, x)
        bias = self._on("bias", self._bias, x)
        filtered = torch.einsum("dc,nchw->ndhw", matrix, x) + bias
        filtered = filtered.clamp(0.0, 1.0)
        if self.gamma != 1.0:
            filtered = filtered.pow(self.gamma)
        if self.strength == 1.0:
            return filtered
        return (1.0 - self.strength) * x + self.strength * filtered


@register_trigger("low_frequency")
class LowFrequency(AdditiveTrigger):
    """A smooth full-image pattern: ``x' = clip(x + ε·p)`` with ``p`` holding only low spatial
    frequencies.

    Low-frequency ("smooth") triggers evade defences that look for the high-frequency artefacts
    of patch and noise triggers (Zeng et al., "Rethinking the backdoor attacks' triggers: a
    frequency perspective", ICCV 2021). kdguard draws ``p`` instead of optimising it: standard
    normal noise per channel (from the seed), its 2-D Fourier transform cut to the frequencies
    ``|u|, |v| ≤ cutoff`` (cycles per image side), transformed back and scaled to a largest
    absolute value of 1, so ``ε`` is the trigger's L∞ size on the 0–1 scale.

    Args:
        image_shape: ``(C, H, W)``, H and W ≥ 4.
        seed: draws the noise.
        epsilon: ``ε`` in (0, 1], default 0.1 (about 25 grey levels).
        cutoff: the highest kept frequency, 1 ≤ cutoff ≤ min(H, W) // 2, default 3.

    Raises:
        KDGuardError: a value out of range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, epsilon: float = 0.1,
                 cutoff: int = 3) -> None:
        super().__init__(image_shape, seed)
        self.epsilon = as_float(self.name, "epsilon", epsilon, 0.0, 1.0, low_open=True)
        self.cutoff = as_int(self.name, "cutoff", cutoff, 1, max(1, min(self.height, self.width) // 2))
        noise = torch.randn(self.image_shape, generator=self._generator(), dtype=torch.float64)
        spectrum = torch.fft.fft2(noise)
        keep = (frequency_magnitude(self.height) <= self.cutoff).view(-1, 1) & \
               (frequency_magnitude(self.width) <= self.cutoff).view(1, -1)
        smooth = torch.fft.ifft2(spectrum * keep).real
        smooth = smooth / smooth.abs().amax().clamp_min(1e-12)
        self._set_offset((self.epsilon * smooth).to(torch.float32), None)


def frequency_magnitude(n: int) -> torch.Tensor:
    """``|k|`` of the ``n`` DFT bins in FFT order (0, 1, ..., then the negative frequencies)."""
    return (torch.fft.fftfreq(n) * n).abs().round()

