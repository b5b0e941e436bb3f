"""Random draws and batch checks shared by every augmentation.

Every draw takes an explicit :class:`torch.Generator` and is made on that generator's device (so
a CPU generator works with a CUDA batch and the results do not depend on where the images are);
the values are then moved to ``device`` when one is given. Nothing reads the global RNG, so a run
that checkpoints its generators resumes bit-exactly.
"""

from __future__ import annotations

import torch

from ..errors import KDGuardError


def check_batch(x: torch.Tensor, what: str, *, floating: bool = False) -> None:
    """Raise :class:`KDGuardError` unless ``x`` is an ``N×C×H×W`` tensor (a float one if ``floating``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or (floating and not x.is_floating_point()):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if floating:
            raise KDGuardError(f"{what} needs a float N×C×H×W batch in [0, 1], got {shape}",
                               "convert uint8 images with kdguard.data.to_float first")
        raise KDGuardError(f"{what} needs an N×C×H×W tensor, got {shape}",
                           "pass a whole batch (add a batch dimension with x[None])")


def rand(size: int | tuple[int, ...], generator: torch.Generator,
         device: torch.device | None = None) -> torch.Tensor:
    """Uniforms in [0, 1) of shape ``size``, drawn on ``generator``'s device, moved to ``device``."""
    values = torch.rand(size, generator=generator, device=generator.device)
    return values if device is None else values.to(device)


def uniform(n: int, low: float, high: float, generator: torch.Generator,
            device: torch.device | None = None) -> torch.Tensor:
    """``n`` uniforms in [low, high): ``U·(high − low) + low``, scaled where drawn, moved to ``device``."""
    values = torch.rand(n, generator=generator, device=generator.device) * (high - low) + low
    return values if device is None else values.to(device)


def randint(n: int, high: int, generator: torch.Generator, device: torch.device | None = None) -> torch.Tensor:
    """``n`` integers in [0, high), drawn on ``generator``'s device, moved to ``device``."""
    values = torch.randint(0, high, (n,), generator=generator, device=generator.device)
    return values if device is None else values.to(device)
