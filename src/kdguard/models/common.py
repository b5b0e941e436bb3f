"""Pieces shared by every built-in architecture: input normalisation, argument checks, init.

Input convention (all kdguard models): ``forward`` takes ``float`` images with values in ``[0, 1]``,
shape ``N×C×H×W``; the per-channel dataset ``mean``/``std`` are applied inside the model by a
:class:`Normalize` module stored as the attribute ``normalize``. The statistics are buffers, so
they travel with ``state_dict`` checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import KDGuardError

#: Channel counts the built-in models accept: 1 (MNIST) or 3 (CIFAR, GTSRB).
SUPPORTED_IN_CHANNELS = (1, 3)

#: Statistics used when none are given: maps ``[0, 1]`` to ``[-1, 1]``.
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5

Stats = Sequence[float] | torch.Tensor | float | None


def _as_stats(name: str, value: Stats, default: float, channels: int) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    if isinstance(value, (int, float)):
        value = (float(value),)
    try:
        values = tuple(float(v) for v in (value.flatten().tolist() if isinstance(value, torch.Tensor)
                                          else value))
    except (TypeError, ValueError):
        raise KDGuardError(f"{name} {value!r} is not a sequence of numbers",
                           f"give {channels} per-channel values in the 0–1 scale, e.g. "
                           f"{(0.5,) * channels}") from None
    if len(values) == 1:
        values = values * channels  # one value broadcast to every channel
    if len(values) != channels:
        raise KDGuardError(f"{name} {values!r} has {len(values)} values for {channels} input channels",
                           f"give 1 or {channels} values")
    if not all(math.isfinite(v) for v in values):
        raise KDGuardError(f"{name} {values!r} contains a non-finite value", "give finite numbers")
    return values


def check_model_args(num_classes: int, in_channels: int, mean: Stats, std: Stats
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate a model constructor's common arguments; return ``(mean, std)`` as C-tuples.

    Args:
        num_classes: number of output logits, an ``int >= 2``.
        in_channels: 1 or 3.
        mean, std: per-channel statistics in the 0–1 scale (1 value is broadcast to C channels);
            ``None`` gives ``0.5``/``0.5``, i.e. inputs mapped to ``[-1, 1]``.

    Raises:
        KDGuardError: any argument is out of range (``std`` must be ``> 0``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KDGuardError(f"num_classes {num_classes!r} is not an integer >= 2",
                           "give the number of classes of the dataset, e.g. 10")
    if isinstance(in_channels, bool) or in_channels not in SUPPORTED_IN_CHANNELS:
        raise KDGuardError(f"in_channels {in_channels!r} is not supported",
                           "give 1 (grayscale, e.g. MNIST) or 3 (RGB, e.g. CIFAR, GTSRB)")
    mean_t = _as_stats("mean", mean, DEFAULT_MEAN, in_channels)
    std_t = _as_stats("std", std, DEFAULT_STD, in_channels)
    if any(s <= 0 for s in std_t):
        raise KDGuardError(f"std {std_t!r} has a value <= 0", "give positive standard deviations")
    return mean_t, std_t


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with input checks.

    Input: ``float`` tensor ``N×C×H×W`` in ``[0, 1]`` (any memory format; channels_last is kept).
    Output: same shape and dtype. ``mean``/``std`` are persistent buffers of shape ``1×C×1×1``.

    Raises:
        KDGuardError: the input is not 4-D, has the wrong channel count, or is not floating point
            (a ``uint8`` batch passed without scaling to ``[0, 1]`` is the usual mistake).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            fix = ("add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else
                   f"pass {self.channels}-channel images, or build the model with build_model(..., "
                   f"in_channels={x.shape[1] if x.dim() == 4 else '<C>'})")
            raise KDGuardError(
                f"model input has shape {tuple(x.shape)}, expected N×{self.channels}×H×W", fix)
        if not x.is_floating_point():
            raise KDGuardError(f"model input has dtype {x.dtype}, expected float in [0, 1]",
                               "convert uint8 images with x.float() / 255")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        fmt = lambda t: ", ".join(f"{v:.4g}" for v in t.flatten().tolist())  # noqa: E731
        return f"mean=({fmt(self.mean)}), std=({fmt(self.std)})"


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit/zero BatchNorm, zero Linear biases.

    He et al., "Delving deep into rectifiers" (ICCV 2015), as used by the reference CIFAR ResNet
    and WRN code; Linear weights keep PyTorch's default uniform init. Models built on the ``meta``
    device (structure only, e.g. for :func:`kdguard.models.stages.stage_paths`) are left alone.
    """
    if any(p.is_meta for p in model.parameters()):
        return  # random init of meta tensors is a slow no-op
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

