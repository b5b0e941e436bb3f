"""ResNet-18, CIFAR variant: He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016), Table 1 (18-layer column), with the usual small-image stem.

The ImageNet stem (7×7 stride-2 conv + 3×3 max-pool) would shrink a 32×32 image to 8×8 before
the first stage; the CIFAR variant used across the backdoor and KD literature (e.g. BackdoorBench,
CRD, SimCLR CIFAR encoders) replaces it by a 3×3 stride-1 conv and drops the max-pool. Stages
``layer1``..``layer4`` hold two :class:`~kdguard.models.resnet_cifar.BasicBlock` s each with 64,
128, 256 and 512 filters; the first block of ``layer2``..``layer4`` halves the resolution and
uses the 1×1 conv + BN projection shortcut (option B, as in the paper's ImageNet models).
11.17M parameters for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, Stats, check_model_args, init_weights
from .resnet_cifar import make_stage


class ResNet18(nn.Module):
    """ResNet-18 with a 3×3 stride-1 stem and no max-pool.

    Args:
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale (see
            :func:`~kdguard.models.common.check_model_args`).

    Input ``float N×C×H×W`` in ``[0, 1]`` → logits ``N×num_classes``. Stage outputs for a 32×32
    input: ``layer1`` 64×32×32, ``layer2`` 128×16×16, ``layer3`` 256×8×8, ``layer4`` 512×4×4;
    ``penultimate`` the pooled 512-d vector. Blocks expose ``preact`` (pre-ReLU sum) like the CIFAR
    ResNets.

    Raises:
        KDGuardError: a bad common argument.
    """

    family = "resnet"  # selects the stage presets in kdguard.models.stages

    def __init__(self, num_classes: int, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None) -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(64, 64, 2, 1, "B")
        self.layer2 = make_stage(64, 128, 2, 2, "B")
        self.layer3 = make_stage(128, 256, 2, 2, "B")
        self.layer4 = make_stage(256, 512, 2, 2, "B")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten(1)
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512
        self.arch = "resnet18"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.penultimate(self.pool(x)))


def resnet18(num_classes: int, in_channels: int = 3, mean: Stats = None,
             std: Stats = None) -> ResNet18:
    """CIFAR-variant ResNet-18; see :class:`ResNet18`."""
    return ResNet18(num_classes, in_channels, mean, std)
