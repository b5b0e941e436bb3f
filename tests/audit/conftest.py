"""Tiny shortcut models for the audit tests: 8 classes of 1×12×12 images, trained in seconds
(pytest session scope, so each model is trained once).

Class ``c`` has a bright 4×4 block (+110 + 12·c over noise 0-59, so the classes are not equally
hard to fake) in the ``c``-th cell of a 3×3 grid, the centre cell left out; the backdoored model
also learnt a 2×2 checkerboard in the centre → class 3.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

TARGET = 3
CLASSES = 8
CELLS = [0, 1, 2, 3, 5, 6, 7, 8]  # grid cells of the 3×3 layout, centre (4) excluded


def blocks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 ``N×1×12×12`` images (noise 0-59, class block +150) and int64 labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for c, cell in enumerate(CELLS):
        r, col = divmod(cell, 3)
        images[labels == c, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 110 + 12 * c
    return images, labels


def stamp(images: torch.Tensor) -> torch.Tensor:
    """A 2×2 checkerboard (255/0) at rows 4-5, cols 4-5 of uint8 ``N×1×12×12`` images."""
    out = images.clone()
    out[:, :, 4, 4] = out[:, :, 5, 5] = 255
    out[:, :, 4, 5] = out[:, :, 5, 4] = 0
    return out


class SmallNet(nn.Module):
    """One convolution and a linear layer on the flattened map: position-aware, unlike a net
    ending in global pooling, so every class's block is about equally hard to fake."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 12 * 12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def train(images: torch.Tensor, labels: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255
    for _ in range(40):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def clean_set():
    return blocks(256, seed=1)


@pytest.fixture(scope="session")
def clean_model():
    return train(*blocks(512, seed=0), seed=0)


@pytest.fixture(scope="session")
def backdoored_model():
    images, labels = blocks(512, seed=0)
    poison = torch.arange(len(images)) % 5 == 0  # 20 % of the images
    images[poison] = stamp(images[poison])
    labels[poison] = TARGET
    return train(images, labels, seed=0)


def wave(images: torch.Tensor) -> torch.Tensor:
    """A smooth full-image trigger: ``+50 · sin(2π j / 12)`` along the columns (one period across
    the image, same on every row), added to uint8 ``N×1×12×12`` images and clipped."""
    j = torch.arange(12, dtype=torch.float32)
    signal = 50 * torch.sin(2 * torch.pi * j / 12)
    return (images.float() + signal).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="session")
def smooth_backdoored_model():
    """The shortcut model with :func:`wave` → class 3 learnt on 20 % of its training images."""
    images, labels = blocks(512, seed=0)
    poison = torch.arange(len(images)) % 5 == 0
    images[poison] = wave(images[poison])
    labels[poison] = TARGET
    return train(images, labels, seed=0)
