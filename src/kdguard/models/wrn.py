"""Wide ResNets WRN-d-k: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016), Table 1.

A 3×3 stem with 16 filters, three groups ``block1``, ``block2``, ``block3`` of N = (d−4)/6
pre-activation units with 16k, 32k and 64k filters (``block2``/``block3`` start with stride 2),
then a final BN + ReLU (``bn_final``), global average pooling and one linear layer.

Each :class:`WideBlock` is BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus a shortcut; where the
width or resolution changes, the shortcut is a 1×1 conv applied to the *activated* input
``relu(bn1(x))``, as in the authors' reference code (the paper does not spell this out).

Because the blocks are pre-activation, a group's output is a raw residual sum; its pre-ReLU,
batch-normalised version is the output of the next group's first ``bn1`` (or of ``bn_final``
after ``block3``). Those three BN outputs are the features OFD distils (Heo et al., ICCV 2019,
reference code ``get_bn_before_relu``). Activations are ``F.relu`` (never in place), so hooked
BN outputs are not overwritten.

Parameter counts for 10 classes: WRN-16-1 0.175M, WRN-16-2 0.69M, WRN-40-1 0.56M,
WRN-40-2 2.2M, WRN-28-4 5.8M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError
from .common import Normalize, Stats, check_model_args, init_weights


class WideBlock(nn.Module):
    """Pre-activation basic unit. Input ``N×C_in×H×W`` → ``N×C_out×H/s×W/s`` (not activated).

    Submodules: ``bn1``, ``conv1``, ``bn2``, ``conv2`` and ``shortcut`` (identity or 1×1 conv).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.shortcut: nn.Module = (nn.Identity() if self.equal_in_out
                                    else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # Reference code: a projection shortcut sees the activated input, an identity the raw one.
        return out + self.shortcut(x if self.equal_in_out else act)


def _group(in_channels: int, out_channels: int, units: int, stride: int,
           drop_rate: float) -> nn.Sequential:
    return nn.Sequential(*[WideBlock(in_channels if i == 0 else out_channels, out_channels,
                                     stride if i == 0 else 1, drop_rate) for i in range(units)])


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016).

    Args:
        depth: total depth d with (d − 4) divisible by 6 (10, 16, 22, 28, 40, ...).
        widen_factor: k ≥ 1.
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale.
        drop_rate: dropout between the two convs of each unit (paper: 0.3 for some runs;
            default 0, as in the KD literature).

    Input ``float N×C×H×W`` in ``[0, 1]`` → logits ``N×num_classes``. Group outputs:
    ``block1`` 16k×H×W, ``block2`` 32k×H/2×W/2, ``block3`` 64k×H/4×W/4; ``penultimate`` the
    pooled 64k-d vector.

    Raises:
        KDGuardError: bad ``depth``/``widen_factor``/``drop_rate`` or common argument.
    """

    family = "wrn"  # selects the stage presets in kdguard.models.stages

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 mean: Stats = None, std: Stats = None, drop_rate: float = 0.0) -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise KDGuardError(f"WRN depth {depth!r} is not of the form 6N+4",
                               "use 10, 16, 22, 28 or 40")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise KDGuardError(f"WRN widen factor {widen_factor!r} is not a positive integer",
                               "use e.g. 1, 2, 4, 8 or 10")
        if not 0.0 <= drop_rate < 1.0:
            raise KDGuardError(f"WRN drop_rate {drop_rate!r} is outside [0, 1)", "use e.g. 0 or 0.3")
        units = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _group(widths[0], widths[1], units, 1, drop_rate)
        self.block2 = _group(widths[1], widths[2], units, 2, drop_rate)
        self.block3 = _group(widths[2], widths[3], units, 2, drop_rate)
        self.bn_final = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        self.arch = f"wrn{depth}_{widen_factor}"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        x = F.relu(self.bn_final(x))
        return self.fc(self.penultimate(self.pool(x)))


def wide_resnet(depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                mean: Stats = None, std: Stats = None, drop_rate: float = 0.0) -> WideResNet:
    """Any WRN-d-k; see :class:`WideResNet`."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, mean, std, drop_rate)


def _wrn(depth: int, widen_factor: int):
    def factory(num_classes: int, in_channels: int = 3, mean: Stats = None, std: Stats = None,
                drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels, mean, std, drop_rate)

    factory.__name__ = f"wrn{depth}_{widen_factor}"
    factory.__doc__ = f"WRN-{depth}-{widen_factor}; see :class:`WideResNet`."
    return factory


wrn16_1 = _wrn(16, 1)
wrn16_2 = _wrn(16, 2)
wrn16_4 = _wrn(16, 4)
wrn28_2 = _wrn(28, 2)
wrn28_4 = _wrn(28, 4)
wrn40_1 = _wrn(40, 1)
wrn40_2 = _wrn(40, 2)
