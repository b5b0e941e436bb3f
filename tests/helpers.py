"""Tiny synthetic datasets and models shared by tests (import as `from helpers import ...`)."""

from __future__ import annotations

import torch
from torch import nn

from kdguard.data.dataset import ImageDataset


class TinyNet(nn.Module):
    """A 2-conv classifier for 1×12×12 or 3×12×12 inputs; ``arch`` marks it as a tiny net."""

    arch = "lenet5"  # treated as a small net: fp32, NCHW

    def __init__(self, num_classes: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def make_blobs(n: int = 64, num_classes: int = 4, channels: int = 1, size: int = 12, seed: int = 0,
               name: str = "blobs") -> ImageDataset:
    """Learnable synthetic images: class c has a bright square in quadrant c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 60, (n, channels, size, size), generator=g, dtype=torch.uint8)
    half = size // 2
    for c in range(num_classes):
        r, col = divmod(c % 4, 2)
        images[labels == c, :, r * half:(r + 1) * half, col * half:(col + 1) * half] += 150
    return ImageDataset(images, labels.long(), tuple(str(c) for c in range(num_classes)), name=name,
                        mean=(0.3,) * channels, std=(0.3,) * channels)


def cli_error(args: list[str], capsys) -> str:
    """Run ``kdguard args`` and return its one-line ``error: ...`` message (asserting exit code 2,
    a single line and no traceback)."""
    from kdguard.cli import main

    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


#: overrides for a seconds-long CLI training run on the embedded MNIST digits
CLI_FAST = ["train.epochs=1", "train.batch_size=64", "train.progress=false", "data.val_fraction=0.05"]
