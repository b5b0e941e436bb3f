"""Hand-built models for the ABD tests (3×8×8 images, 4 classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (3, 8, 8)
CLASSES = 4
TARGET = 2


class ShortcutNet(nn.Module):
    """A "backdoored" net whose trigger survives channel shuffling, as ABD's intuition says.

    ``conv1`` (1×1, 3 → 8) reads clean evidence from the red and green channels with channel-
    specific weights, and the blue channel (the trigger) with the *same* weight into every
    feature channel. A triggered image therefore produces a feature map that is uniform across
    channels, which a permutation of ``conv2``'s input channels cannot change; clean images give
    channel-specific features that a shuffle scrambles. ``conv2``'s rows are built so a uniform
    feature vector scores class ``TARGET`` highest.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, width, 1)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, CLASSES)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:, :2, 0, 0] = torch.randn(width, 2, generator=g) * 2
            self.conv1.weight[:, 2, 0, 0] = 20.0  # trigger → every channel alike, strongly
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(torch.randn(width, width, 1, 1, generator=g))
            self.conv2.bias.zero_()
            self.fc.weight.copy_(torch.randn(CLASSES, width, generator=g))
            # uniform features u·1 → conv2 gives u·rowsum(W2); make the target's logit win
            rowsum = self.conv2.weight.sum(dim=(1, 2, 3)).clamp_min(0)
            self.fc.weight[TARGET] = rowsum / rowsum.norm()
            self.fc.bias.zero_()
            self.fc.bias[TARGET] = -10.0  # only the strong uniform (trigger) features reach it
            # centre the other classes' logits on clean images so clean predictions spread out
            logits = self(clean_images(512, seed=99))
            others = [c for c in range(CLASSES) if c != TARGET]
            self.fc.bias[others] -= logits[:, others].mean(0)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def clean_images(n: int, seed: int = 0) -> torch.Tensor:
    """Flat red/green images (a random colour each, plus pixel noise) with an empty blue
    (trigger) channel."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    x = (colour + 0.05 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)
    x[:, 2] = 0.0
    return x


def triggered(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, 2] = 1.0
    return x


class _Kit:
    SHAPE, CLASSES, TARGET = SHAPE, CLASSES, TARGET
    ShortcutNet = ShortcutNet
    clean_images = staticmethod(clean_images)
    triggered = staticmethod(triggered)


@pytest.fixture
def abd_kit() -> type[_Kit]:
    return _Kit
