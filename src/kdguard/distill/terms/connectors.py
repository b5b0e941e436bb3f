"""Connectors (regressors) that map student features to the teacher's feature shape.

FitNets calls it the regressor r (Romero et al. 2015, §2.2); OFD the connector (Heo et al. 2019,
§3.4: a 1×1 convolution followed by batch normalisation, which its reference code also uses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import KDGuardError


class Connector(nn.Module):
    """Student features → teacher shape.

    * Feature maps (per-sample shapes ``C_s×H_s×W_s`` → ``C_t×H_t×W_t``): if the spatial sizes
      differ, the map is first adaptive-average-pooled to ``H_t×W_t``; then a bias-free 1×1
      convolution C_s → C_t and a BatchNorm2d (OFD's connector). Conv init: He-normal, fan-out
      (the reference code's ``normal_(0, sqrt(2/n))`` with n = k·k·C_out); BN: weight 1, bias 0.
    * Vectors (``D_s`` → ``D_t``): a Linear layer (with bias; ``bn`` adds a BatchNorm1d).

    Args:
        s_shape, t_shape: per-sample shapes (without the batch dimension).
        bn: append batch normalisation (default True).

    Raises:
        KDGuardError: the shapes are neither both 3-D nor both 1-D.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], *, bn: bool = True) -> None:
        super().__init__()
        s_shape, t_shape = tuple(s_shape), tuple(t_shape)
        self.t_spatial: tuple[int, ...] | None = None
        if len(s_shape) == 3 and len(t_shape) == 3:
            self.t_spatial = t_shape[1:]
            self.resize = s_shape[1:] != t_shape[1:]
            conv = nn.Conv2d(s_shape[0], t_shape[0], kernel_size=1, bias=not bn)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.proj: nn.Module = nn.Sequential(conv, nn.BatchNorm2d(t_shape[0])) if bn else conv
        elif len(s_shape) == 1 and len(t_shape) == 1:
            self.resize = False
            linear = nn.Linear(s_shape[0], t_shape[0])
            self.proj = nn.Sequential(linear, nn.BatchNorm1d(t_shape[0])) if bn else linear
        else:
            raise KDGuardError(f"cannot connect student features of shape {s_shape} to teacher "
                               f"features of shape {t_shape}",
                               "pair feature maps (C×H×W) with feature maps, or vectors with vectors")
        for m in self.proj.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            x = F.adaptive_avg_pool2d(x, self.t_spatial)
        return self.proj(x)


def connectors_for(s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                   mode: str = "auto", bn: bool = True) -> nn.ModuleList:
    """One connector per feature pair.

    Args:
        mode: ``"auto"`` (identity where shapes already match, a :class:`Connector` elsewhere),
            ``"always"`` (a connector on every pair) or ``"none"`` (identity everywhere; the loss
            then requires equal shapes).
    """
    if mode not in ("auto", "always", "none"):
        raise KDGuardError(f"unknown connector mode {mode!r}", "use 'auto', 'always' or 'none'")
    out = nn.ModuleList()
    for s, t in zip(s_shapes, t_shapes):
        same = tuple(s) == tuple(t)
        out.append(Connector(s, t, bn=bn) if mode == "always" or (mode == "auto" and not same)
                   else nn.Identity())
    return out
