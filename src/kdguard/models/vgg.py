"""VGG with batch normalisation, CIFAR variant: Simonyan & Zisserman, "Very Deep Convolutional
Networks for Large-Scale Image Recognition" (ICLR 2015), Table 1 configurations A (VGG-11),
B (VGG-13), D (VGG-16) and E (VGG-19), with BN (Ioffe & Szegedy 2015) after every conv.

The five conv blocks (``block1``..``block5``, 64/128/256/512/512 filters of 3×3) follow the paper;
each is followed by a 2×2 max-pool (``pool1``..``pool5``, ``ceil_mode=True`` so that a 28×28
MNIST input still reaches 1×1 instead of vanishing). The paper's three-layer 4096-wide head is
replaced by the small-image head common in CIFAR code (e.g. CRD/RepDistiller): global average
pooling and **one** linear layer 512 → classes. Convs carry no bias (the following BN has one).
VGG-16-BN has 14.7M parameters for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError
from .common import Normalize, Stats, check_model_args, init_weights

#: Filters per conv of each of the five blocks (paper Table 1).
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class ConvBNReLU(nn.Module):
    """3×3 conv (``conv``) → BN (``bn``, the pre-ReLU tap point) → ReLU; keeps H×W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    """VGG-``depth``-BN for small images.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale.

    Input ``float N×C×H×W`` in ``[0, 1]`` → logits ``N×num_classes``. Block outputs (before
    pooling) for a 32×32 input: ``block1`` 64×32×32, ``block2`` 128×16×16, ``block3`` 256×8×8,
    ``block4`` 512×4×4, ``block5`` 512×2×2; ``penultimate`` the pooled 512-d vector.

    Raises:
        KDGuardError: unsupported ``depth`` or a bad common argument.
    """

    family = "vgg"  # selects the stage presets in kdguard.models.stages

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None) -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        if depth not in CONFIGS:
            raise KDGuardError(f"VGG depth {depth!r} is not supported",
                               f"use one of {', '.join(map(str, CONFIGS))}")
        self.normalize = Normalize(mean, std)
        width = in_channels
        for i, filters in enumerate(CONFIGS[depth], start=1):
            units = []
            for out in filters:
                units.append(ConvBNReLU(width, out))
                width = out
            setattr(self, f"block{i}", nn.Sequential(*units))
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten(1)
        self.fc = nn.Linear(width, num_classes)
        self.feature_dim = width
        self.num_blocks = len(CONFIGS[depth])
        self.arch = f"vgg{depth}_bn"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"block{i}")(x))
        return self.fc(self.penultimate(self.pool(x)))


def _vgg(depth: int):
    def factory(num_classes: int, in_channels: int = 3, mean: Stats = None,
                std: Stats = None) -> VGG:
        return VGG(depth, num_classes, in_channels, mean, std)

    factory.__name__ = f"vgg{depth}_bn"
    factory.__doc__ = f"VGG-{depth} with BN, CIFAR head; see :class:`VGG`."
    return factory


vgg11_bn = _vgg(11)
vgg13_bn = _vgg(13)
vgg16_bn = _vgg(16)
vgg19_bn = _vgg(19)
