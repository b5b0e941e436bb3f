"""Tiny models and data for the RobustKD tests (reached through fixtures: importlib mode).

* ``planted``: a hand-built classifier with a *planted* backdoor channel that is dormant on clean
  images and fires on a 2×2 white patch, plus clean and triggered data; deterministic, no training.
* ``active_planted``: a hand-built classifier whose backdoor rides a channel the clean task also
  uses (no dormant unit): the case of RobustKD's learned blended trigger.
* ``bn_pair``: a small teacher/student pair of BN convnets with ``pre_relu`` stage presets.
* ``backdoored_tinynet``: a BN convnet trained in about a second on blob images with a planted
  3×3 checkerboard backdoor (target 0).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_blobs

SIZE = 8
TRIGGER_CHANNEL = 1


class HandNet(nn.Module):
    """1×8×8 images in [0, 1] → 2 classes: class 0 if the left half is brighter, else class 1.

    ``stage`` (an identity tap point) carries the 4 channels of a 1×1 convolution
    (``conv_weight``, ``conv_bias``). After a ReLU, a linear head reads left − right of the
    ``clean`` channels into class 0 (and the opposite into class 1) and adds ``backdoor``
    (``8×8`` head weights) on channel 1 to class 0. Frozen, no training.
    """

    def __init__(self, conv_weight, conv_bias, clean: tuple[int, ...], backdoor: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.stage = nn.Identity()
        self.fc = nn.Linear(4 * SIZE * SIZE, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(conv_weight).view(4, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor(conv_bias))
            side = torch.ones(SIZE, SIZE)
            side[:, SIZE // 2:] = -1.0  # +1 on the left half, −1 on the right half
            w = torch.zeros(2, 4, SIZE, SIZE)
            for c in clean:
                w[0, c], w[1, c] = side, -side
            w[0, TRIGGER_CHANNEL] += backdoor
            self.fc.weight.copy_(w.flatten(1))
            self.fc.bias.zero_()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.stage(self.conv(x))).flatten(1))


def planted_net() -> HandNet:
    """Channels 0 = x (clean signal), 1 = 10x − 7 (negative for every clean pixel ≤ 0.5: the
    planted, dormant backdoor channel, +5 per active pixel to class 0), 2 = constant −1
    (dormant, harmless), 3 = x again."""
    return HandNet([1.0, 10.0, 0.0, 1.0], [0.0, -7.0, -1.0, 0.0], clean=(0, 3), backdoor=torch.full((SIZE, SIZE), 5.0))


CHECKER = (torch.arange(SIZE).view(-1, 1) + torch.arange(SIZE).view(1, -1)) % 2


def active_planted_net() -> HandNet:
    """A backdoor on an *active* channel: channels 0, 1, 3 = x all carry the clean signal,
    2 = constant −1. Channel 1 also adds ``20·(2K − 1)`` to class 0 (``K`` the 0/1
    checkerboard): about zero on clean images, ``+20·0.2·32 = 128`` on images blended with the
    checkerboard at α = 0.2. No unit is dormant on clean data, so a defence that looks for
    dormant units has nothing to find (the case of RobustKD's learned blended trigger)."""
    return HandNet([1.0, 1.0, 0.0, 1.0], [0.0, 0.0, -1.0, 0.0], clean=(0, 1, 3),
                   backdoor=20.0 * (2 * CHECKER - 1).float())


def planted_data(n: int, seed: int, offset: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images: noise in [0, 0.3] plus ``offset`` on the left (class 0) or right half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.3
    x[labels == 0, :, :, : SIZE // 2] += offset
    x[labels == 1, :, :, SIZE // 2:] += offset
    return (x * 255).round().to(torch.uint8), labels.long()


def patch_trigger(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, 1:3, -3:-1] = 255
    return out


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images.float() / 255).argmax(1) == labels).float().mean())


@pytest.fixture(scope="session")
def planted():
    x, y = planted_data(256, seed=0)
    xt, yt = planted_data(200, seed=1)
    ns = SimpleNamespace(model=planted_net().eval(), x=x, y=y, x_test=xt, y_test=yt, trigger=patch_trigger,
                         accuracy=accuracy, trigger_channel=TRIGGER_CHANNEL)
    assert accuracy(ns.model, xt, yt) == 1.0
    assert accuracy(ns.model, patch_trigger(xt[yt == 1]), torch.zeros(int((yt == 1).sum()), dtype=torch.long)) == 1.0
    return ns


def checker_blend(images: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    return ((1 - alpha) * images.float() + alpha * 255 * CHECKER.float()).round().to(torch.uint8)


@pytest.fixture(scope="session")
def active_planted():
    x, y = planted_data(256, seed=0, offset=0.5)
    xt, yt = planted_data(200, seed=1, offset=0.5)
    ns = SimpleNamespace(model=active_planted_net().eval(), x=x, y=y, x_test=xt, y_test=yt, trigger=checker_blend,
                         accuracy=accuracy, trigger_channel=TRIGGER_CHANNEL)
    assert accuracy(ns.model, xt, yt) == 1.0
    assert accuracy(ns.model, checker_blend(xt[yt == 1]), torch.zeros(int((yt == 1).sum()), dtype=torch.long)) == 1.0
    return ns


class BNNet(nn.Module):
    """stem → block1 (conv-bn, 8×8) → block2 (conv-bn, stride 2) → pool → fc; 3×8×8 inputs."""

    def __init__(self, width: int = 8, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)
        self.stage_presets = {"stages": ["bn1", "bn2"], "pre_relu": ["bn1", "bn2"],
                              "pre_relu_bn": ["bn1", "bn2"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def bn_pair():
    torch.manual_seed(0)
    teacher, student = BNNet(width=8).eval(), BNNet(width=4)
    with torch.no_grad():  # non-trivial BN statistics, so margins and features are not degenerate
        for bn in (teacher.bn1, teacher.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    return SimpleNamespace(teacher=teacher, student=student, shape=(3, 8, 8), cls=BNNet)


def checker_trigger(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, -3:, -3:] = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    return out


@pytest.fixture(scope="session")
def backdoored_tinynet():
    """A BNNet (1 channel, 12×12) trained with 10 % checkerboard-poisoned blobs (target 0)."""
    torch.manual_seed(0)
    train, test = make_blobs(n=1024, seed=1, size=12), make_blobs(n=512, seed=2, size=12)
    x, y = train.images.clone(), train.labels.clone()
    idx = torch.randperm(len(x))[:100]
    idx = idx[y[idx] != 0]
    x[idx], y[idx] = checker_trigger(x[idx]), 0
    model = BNNet(width=16, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        perm = torch.randperm(len(x))
        for b in range(0, len(x), 64):
            i = perm[b:b + 64]
            loss = F.cross_entropy(model(x[i].float() / 255), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return SimpleNamespace(model=model, train=train, test=test, trigger=checker_trigger, accuracy=accuracy)
