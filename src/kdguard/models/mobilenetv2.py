"""MobileNetV2, CIFAR variant: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018), Table 2.

Table 2's bottleneck sequence (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2)
(6,96,3,1) (6,160,3,2) (6,320,1,1), then a 1×1 conv to 1280 channels, global pooling and a linear
classifier. For 32×32 inputs the two first down-samplings are removed, as in the widely used CIFAR
adaptation: the stem conv has stride 1 (paper: 2) and the (6,24,2,·) sequence has stride 1
(paper: 2), leaving an overall stride of 8 (32×32 → 4×4). No dropout before the classifier (the
paper mentions none).

The bottlenecks are grouped by resolution into four stages (tap points for feature distillation):
``layer1`` = (1,16) + (6,24) at H×W, ``layer2`` = (6,32) at H/2, ``layer3`` = (6,64) + (6,96) at
H/4, ``layer4`` = (6,160) + (6,320) at H/8. Block outputs are linear (no ReLU6 after the
projection), so stage outputs are already "pre-activation" features.

``width_mult`` scales every width (rounded to multiples of 8); the last 1280-channel conv is only
widened for multipliers above 1, never narrowed, as in the paper (§5.1). 2.24M parameters for
width 1 and 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError
from .common import Normalize, Stats, check_model_args, init_weights

#: (expansion t, output channels c, repeats n, first stride s) per stage, CIFAR strides.
STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """Expand 1×1 (``conv1``/``bn1``, absent when t = 1) → depthwise 3×3 (``conv2``/``bn2``) →
    linear project 1×1 (``conv3``/``bn3``); identity residual when stride 1 and widths match.

    Input ``N×C_in×H×W`` → ``N×C_out×H/s×W/s`` (linear output, may be negative).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = expansion != 1
        if self.expand:
            self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv1(x))) if self.expand else x
        out = F.relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.residual else out


class MobileNetV2(nn.Module):
    """CIFAR-variant MobileNetV2 (Sandler et al. 2018).

    Args:
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale.
        width_mult: width multiplier α > 0 (1.0 in the paper's main model; 0.5 is the CRD
            student).

    Input ``float N×C×H×W`` in ``[0, 1]`` → logits ``N×num_classes``. Stage outputs for
    α = 1 and a 32×32 input: ``layer1`` 24×32×32, ``layer2`` 32×16×16, ``layer3`` 96×8×8,
    ``layer4`` 320×4×4; ``penultimate`` the pooled 1280-d vector.

    Raises:
        KDGuardError: ``width_mult`` is not positive, or a bad common argument.
    """

    family = "mobilenetv2"  # selects the stage presets in kdguard.models.stages

    def __init__(self, num_classes: int, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None, width_mult: float = 1.0) -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        if not isinstance(width_mult, (int, float)) or not 0 < width_mult <= 4:
            raise KDGuardError(f"MobileNetV2 width_mult {width_mult!r} is outside (0, 4]",
                               "use e.g. 0.5, 0.75 or 1.0")
        self.normalize = Normalize(mean, std)
        width = make_divisible(32 * width_mult)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        for stage in STAGES:
            blocks = []
            for t, c, n, s in stage:
                out = make_divisible(c * width_mult)
                for i in range(n):
                    blocks.append(InvertedResidual(width, out, s if i == 0 else 1, t))
                    width = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        self.conv2 = nn.Conv2d(width, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten(1)
        self.fc = nn.Linear(last, num_classes)
        self.feature_dim = last
        self.arch = "mobilenetv2"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu6(self.bn2(self.conv2(x)))
        return self.fc(self.penultimate(self.pool(x)))


def mobilenetv2(num_classes: int, in_channels: int = 3, mean: Stats = None, std: Stats = None,
                width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR-variant MobileNetV2, width 1.0 by default; see :class:`MobileNetV2`."""
    return MobileNetV2(num_classes, in_channels, mean, std, width_mult)


def mobilenetv2_x0_5(num_classes: int, in_channels: int = 3, mean: Stats = None,
                     std: Stats = None) -> MobileNetV2:
    """CIFAR-variant MobileNetV2 with width multiplier 0.5; see :class:`MobileNetV2`."""
    model = MobileNetV2(num_classes, in_channels, mean, std, 0.5)
    model.arch = "mobilenetv2_x0_5"
    return model
