"""Clean-data statistics of a model's stage features: what RobustKD's detoxification starts from.

For each tapped stage ``l`` with features ``F_l ∈ R^{N×C×H×W}`` on clean images, one pass
(teacher in eval mode, no gradient) accumulates, in float64:

* ``mean`` ``C×H×W``: ``μ_l = E_n[F_l]``, the clean mean feature map. It initialises the
  replacement ``P`` (the "feature initialisation" step of RobustKD, as described by third-party
  reviews of Chen et al. 2024; the shipped ``.pt`` files hold C×H×W tensors per stage).
* ``var_channel`` ``C``: ``Var_{n,h,w}[a(F_{l,c})]``, the variance of channel c over samples and
  positions, and ``var_element`` ``C×H×W``: ``Var_n[a(F_{l,c,h,w})]``. ``a`` is ``relu`` (default:
  the default detox paths are pre-ReLU taps, and the negative side is erased by the ReLU that
  follows, so it carries no signal downstream) or the identity (``activation="none"``).
* ``act_mean`` ``C``: ``E_{n,h,w}[a(F_{l,c})]``, the mean activation per channel (fine-pruning's
  ranking, Liu et al. 2018).

Replacing a channel by its clean mean distorts clean features by exactly
``E‖F̂ − F‖² = m²·Var[F]`` (for ``P = μ``), which is why the clean variance is the natural price of
masking a channel in :mod:`kdguard.defenses.robustkd.objective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...data.batches import to_float
from ...errors import KDGuardError
from ...runtime import eval_mode
from ...distill.probe import GuardedTaps

ACTIVATIONS = ("relu", "none")


@dataclass(frozen=True)
class StageStats:
    """Clean statistics of one stage (float32, CPU). Shapes as in the module docstring."""

    mean: torch.Tensor
    var_channel: torch.Tensor
    var_element: torch.Tensor
    act_mean: torch.Tensor
    count: int
    activation: str = "relu"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)  # type: ignore[return-value]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KDGuardError(f"clean images must be a non-empty N×C×H×W tensor, got {shape}",
                           "pass the clean subset's images (uint8 0-255 or float 0-1)")


@torch.no_grad()
def clean_feature_stats(model: nn.Module, paths: Sequence[str], images: torch.Tensor, *,
                        batch_size: int = 256, device: torch.device | str = "cpu",
                        activation: str = "relu") -> dict[str, StageStats]:
    """One pass of ``model`` over clean ``images``; per-path :class:`StageStats`.

    Args:
        model: the teacher (put in eval mode for the pass; its mode is restored after).
        paths: module paths whose outputs are 4-D feature maps ``N×C×H×W``.
        images: ``N×C×H×W`` uint8 (0–255) or float (0–1) clean images.
        batch_size: images per forward pass.
        device: where the pass runs.
        activation: ``"relu"`` or ``"none"``, the ``a`` applied before the variance/activation
            statistics (the mean map is always of the raw feature).

    Returns:
        ``{path: StageStats}`` in the order of ``paths``.

    Raises:
        KDGuardError: empty/ill-shaped images, bad batch size or activation, an unknown path,
            or a path whose output is not a 4-D feature map.
    """
    _check_images(images)
    if activation not in ACTIVATIONS:
        raise KDGuardError(f"feature-statistics activation {activation!r} is not supported",
                           f"use one of: {', '.join(ACTIVATIONS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KDGuardError(f"batch size {batch_size!r} is not a positive integer", "use e.g. 256")
    device = torch.device(device)
    sums: dict[str, list[torch.Tensor]] = {}
    # guarded: an in-place op after a tapped module (e.g. ReLU(inplace=True)) would corrupt the stats
    with eval_mode(model), GuardedTaps(model, list(paths), detach=True) as taps:
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start:start + batch_size], device)
            _, feats = taps(x)
            for path, f in feats.items():
                if f.dim() != 4:
                    raise KDGuardError(f"detox stage {path!r} outputs shape {tuple(f.shape)}, not N×C×H×W",
                                       "choose convolutional stage outputs (see stage_paths)")
                f = f.double()
                a = f.clamp_min(0) if activation == "relu" else f
                parts = [f.sum(0), a.sum(0), a.pow(2).sum(0)]
                if path not in sums:
                    sums[path] = [torch.zeros_like(p) for p in parts]
                for acc, p in zip(sums[path], parts):
                    acc += p
    n = images.shape[0]
    out: dict[str, StageStats] = {}
    for path in paths:
        raw_sum, act_sum, act_sq = sums[path]
        hw = raw_sum.shape[1] * raw_sum.shape[2]
        mean_el = act_sum / n
        var_el = (act_sq / n - mean_el.pow(2)).clamp_min(0)
        mean_c = act_sum.sum((1, 2)) / (n * hw)
        var_c = (act_sq.sum((1, 2)) / (n * hw) - mean_c.pow(2)).clamp_min(0)
        out[path] = StageStats(mean=(raw_sum / n).float().cpu(), var_channel=var_c.float().cpu(),
                               var_element=var_el.float().cpu(), act_mean=mean_c.float().cpu(),
                               count=n, activation=activation)
    return out


def normalized_variance(stats: StageStats, granularity: str, eps: float = 1e-8) -> torch.Tensor:
    """``v̂ = Var / mean(Var)`` per mask unit of one stage (mean 1 over the stage's units).

    ``granularity="channel"`` → ``C×1×1`` from ``var_channel``; ``"element"`` → ``C×H×W`` from
    ``var_element``. A stage with zero variance everywhere gives all zeros.
    """
    if granularity == "channel":
        v = stats.var_channel.view(-1, 1, 1)
    elif granularity == "element":
        v = stats.var_element
    else:
        raise KDGuardError(f"unknown mask granularity {granularity!r}", "use 'channel' or 'element'")
    return v / (v.mean() + eps)
