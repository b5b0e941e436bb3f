"""LeNet-5: LeCun et al., "Gradient-Based Learning Applied to Document Recognition"
(Proc. IEEE 1998), Fig. 2, in its usual modern form.

C1 (6 filters 5×5) → S2 → C3 (16 filters 5×5) → S4 → C5/F (120) → F6 (84) → output. Modern
departures from the paper, as in most backdoor/KD code: ReLU instead of scaled tanh, 2×2 max-pool
instead of trainable average subsampling, full C3 connectivity instead of the paper's partial
table, a linear output layer instead of RBF units. C1 pads by 2 so a 28×28 MNIST digit gets the
paper's 32×32 field; an adaptive average pool (``pool``) brings the C3/S4 map to 5×5 whatever the
input size (identity for 28×28; 6×6 → 5×5 for 32×32 inputs), so C5 is a 400 → 120 linear layer.
61.7k parameters for 1 input channel and 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, Stats, check_model_args, init_weights


class ConvPool(nn.Module):
    """5×5 conv (``conv``, output = pre-ReLU tap point) → ReLU → 2×2 max-pool (``pool``)."""

    def __init__(self, in_channels: int, out_channels: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 5, 1, padding)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.conv(x)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling.

    Args:
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale.

    Input ``float N×C×H×W`` in ``[0, 1]`` (H, W ≥ 12) → logits ``N×num_classes``. Stage
    outputs: ``block1`` 6×14×14 and ``block2`` 16×5×5 for 28×28 inputs (6×16×16, 16×6×6 for
    32×32); ``penultimate`` the 84-d F6 activation (after ReLU).

    Raises:
        KDGuardError: a bad common argument.
    """

    family = "lenet"  # selects the stage presets in kdguard.models.stages

    def __init__(self, num_classes: int, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None) -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.block1 = ConvPool(in_channels, 6, padding=2)
        self.block2 = ConvPool(6, 16, padding=0)
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.penultimate = nn.Identity()
        self.fc = nn.Linear(84, num_classes)
        self.feature_dim = 84
        self.arch = "lenet5"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.normalize(x)))
        x = F.relu(self.fc1(self.flatten(self.pool(x))))
        x = self.penultimate(F.relu(self.fc2(x)))
        return self.fc(x)


def lenet5(num_classes: int, in_channels: int = 3, mean: Stats = None,
           std: Stats = None) -> LeNet5:
    """LeNet-5 (LeCun et al. 1998, modernised); see :class:`LeNet5`."""
    return LeNet5(num_classes, in_channels, mean, std)
