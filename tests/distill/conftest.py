"""Tiny convnets and fixtures for the distiller tests.

``pair``: a narrower student and a wider teacher for 3×8×8 inputs; ``batch``: one batch
``(x, y, index)``; ``tiny``: the input shape, the module paths of the three feature kinds and the
model class (the suite runs in importlib mode, so tests reach these through fixtures).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5

# module paths of the three feature kinds in TinyConvNet
STAGES = ["block1", "block2"]
PRE_RELU = ["block1.bn", "block2.bn"]
PENULTIMATE = ["flat"]


class Block(nn.Module):
    """conv → bn → ReLU; the ReLU is out of place unless asked, so the BN output stays a valid tap."""

    def __init__(self, cin: int, cout: int, stride: int, inplace_relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=inplace_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class TinyConvNet(nn.Module):
    """stem → block1 (W, 8×8) → block2 (2W, 4×4) → pool → flat → fc."""

    def __init__(self, width: int = 4, num_classes: int = NUM_CLASSES, inplace_relu: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block1 = Block(width, width, 1, inplace_relu)
        self.block2 = Block(width, 2 * width, 2, inplace_relu)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():  # non-trivial BN affine parameters for OFD margins
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return self.fc(self.flat(self.pool(self.block2(self.block1(x)))))


TINY = SimpleNamespace(
    input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, stages=STAGES, pre_relu=PRE_RELU,
    penultimate=PENULTIMATE, net=TinyConvNet,
    kind_paths={"stages": STAGES, "pre_relu": PRE_RELU, "penultimate": PENULTIMATE})


@pytest.fixture
def tiny() -> SimpleNamespace:
    return TINY


@pytest.fixture
def pair() -> tuple[TinyConvNet, TinyConvNet]:
    torch.manual_seed(0)
    teacher = TinyConvNet(width=6)
    student = TinyConvNet(width=4)
    return student, teacher


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (6,), generator=g)
    index = torch.randperm(20, generator=g)[:6]
    return x, y, index
