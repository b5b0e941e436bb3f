"""WaNet: warping-based backdoor trigger (Nguyen & Tran, "WaNet – Imperceptible Warping-based
Backdoor Attack", ICLR 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import KDGuardError
from .base import Trigger, register_trigger
from .validate import as_float, as_int


@register_trigger("wanet")
class WaNet(Trigger):
    """Warp every image with one fixed, smooth, seeded displacement field.

    Construction (paper, warping-function section, and the authors' reference code):

    1. a ``k×k×2`` control grid of uniform offsets in [−1, 1] (seeded), divided by its mean
       absolute value;
    2. upsampled bicubically (``align_corners=True``) to ``H×W`` → ``noise``;
    3. ``grid = clamp((identity + strength · noise / H) · grid_rescale, −1, 1)``, where
       ``identity`` is the ``[−1, 1]`` sampling grid of ``F.grid_sample``;
    4. ``x' = grid_sample(x, grid, mode="bilinear", align_corners=True)``.

    Both offset axes are divided by ``H`` as in the reference code (which assumes square images).

    WaNet's "noise mode" (training also on images warped by ``grid`` plus random per-sample
    noise, labels unchanged, to make the backdoor harder to detect) is not part of the trigger;
    :meth:`noisy_grid` and :meth:`warp` provide it for a training loop that wants it.

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the control grid.
        k: control-grid size, 2 ≤ k ≤ min(H, W); default 4 (paper, CIFAR-10).
        strength: ``s`` in the paper, ≥ 0; default 0.5. 0 gives the identity warp.
        grid_rescale: ``grid_rescale`` of the reference code (default 1).

    Raises:
        KDGuardError: a parameter out of range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, k: int = 4,
                 strength: float = 0.5, grid_rescale: float = 1.0) -> None:
        super().__init__(image_shape, seed)
        self.k = as_int(self.name, "k", k, 2, min(self.height, self.width))
        self.strength = as_float(self.name, "strength", strength, 0.0, float(self.height))
        self.grid_rescale = as_float(self.name, "grid_rescale", grid_rescale, 0.0, 10.0,
                                     low_open=True)
        control = torch.rand(1, 2, self.k, self.k, generator=self._generator()) * 2 - 1
        control = control / control.abs().mean()
        noise = F.interpolate(control, size=(self.height, self.width), mode="bicubic",
                              align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, self.height),
                                    torch.linspace(-1, 1, self.width), indexing="ij")
        identity = torch.stack((cols, rows), dim=-1).unsqueeze(0)  # grid_sample wants (x, y)
        grid = (identity + self.strength * noise / self.height) * self.grid_rescale
        self._grid = grid.clamp(-1, 1)

    @property
    def grid(self) -> torch.Tensor:
        """``float32`` ``1×H×W×2`` sampling grid in [−1, 1] (``(x, y)`` order of grid_sample)."""
        return self._grid.clone()

    def noisy_grid(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` noise-mode grids ``clamp(grid + u / H, −1, 1)``, ``u ~ U[−1, 1]^(H×W×2)``.

        Returns ``float32`` ``n×H×W×2`` on the CPU; ``generator`` (CPU) makes it reproducible.
        """
        n = as_int(self.name, "n", n, 0)
        u = torch.rand(n, self.height, self.width, 2, generator=generator) * 2 - 1
        return (self._grid + u / self.height).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Warp ``x`` (as :meth:`__call__` accepts) with a given grid ``N×H×W×2`` or ``1×H×W×2``,
        e.g. from :meth:`noisy_grid`. Same dtype/shape/device rules as :meth:`__call__`."""
        if grid.dim() != 4 or tuple(grid.shape[1:]) != (self.height, self.width, 2):
            raise KDGuardError(f"wanet grid has shape {tuple(grid.shape)}",
                               f"give an N×{self.height}×{self.width}×2 grid (see noisy_grid)")
        return self._run(x, lambda b: self._sample(b, grid.to(b.device, b.dtype)))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._sample(x, self._on("grid", self._grid, x))

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[0] != x.shape[0]:
            if grid.shape[0] != 1:
                raise KDGuardError(f"wanet got {grid.shape[0]} grids for {x.shape[0]} images",
                                   "give one grid per image or a single grid")
            grid = grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
