"""PNG grids of synthetic images (plain tensors → PIL; written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from ..errors import KDGuardError
from ..io import atomic_write


def image_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile float images ``N×C×H×W`` (clamped to [0, 1]) into one ``uint8`` ``H'×W'×C`` array.

    ``nrow`` images per row (default ⌈√N⌉); ``padding`` white pixels between tiles.

    Raises:
        KDGuardError: ``images`` is not a non-empty 4-D tensor with 1 or 3 channels.
    """
    if images.dim() != 4 or len(images) == 0 or images.shape[1] not in (1, 3):
        raise KDGuardError(f"cannot tile images of shape {tuple(images.shape)}",
                           "pass a non-empty N×C×H×W batch with 1 or 3 channels")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    x = images.detach().float().cpu().clamp(0.0, 1.0)
    for i in range(n):  # at most a few dozen tiles per preview
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0)


def save_image_grid(path: str | Path, images: torch.Tensor, *, nrow: int | None = None,
                    scale: int = 2) -> Path:
    """Write :func:`image_grid` of ``images`` to a PNG at ``path`` (nearest-upscaled ×``scale``)."""
    arr = image_grid(images, nrow=nrow).numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))
