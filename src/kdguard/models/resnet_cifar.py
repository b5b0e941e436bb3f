"""CIFAR ResNets with 6n+2 layers: He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016), §4.2.

A 3×3 stem with 16 filters, then three stages (``layer1``, ``layer2``, ``layer3``) of ``n``
:class:`BasicBlock` s with 16, 32 and 64 filters (the first block of ``layer2``/``layer3``
halves the resolution), global average pooling and one linear layer: ResNet-8/20/32/56 have
n = 1/3/5/9.

Shortcuts where the shape changes: the paper uses **option A** for CIFAR (identity with zero
padding of the new channels, parameter-free). The KD benchmark code most results are compared
against (CRD/RepDistiller, mdistiller) uses a 1×1 convolution + BN projection, i.e. **option B**.
kdguard follows option B by default (``shortcut="B"``) so parameter counts and accuracies match
those KD tables; ``shortcut="A"`` gives the paper's version. The two differ by 2,752 parameters
(ResNet-20 with 10 classes: 272,474 with B, 269,722 with A).

Activations are ``F.relu`` calls (no ReLU modules, nothing in place), so every module output that a
hook records stays valid. Each block applies an ``nn.Identity`` named ``preact`` to the residual sum
*before* its final ReLU: tapping ``layerK.<last>.preact`` gives the pre-ReLU stage output used by
OFD (Heo et al., ICCV 2019) on post-activation ResNets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError
from .common import Normalize, Stats, check_model_args, init_weights

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append zero channels up to ``out_channels``.

    Input ``N×C_in×H×W`` → output ``N×C_out×ceil(H/s)×ceil(W/s)``; parameter-free.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; post-activation (ReLU after the sum).

    Input ``N×C_in×H×W`` → output ``N×C_out×H/s×W/s`` (float, ≥ 0). Submodules: ``conv1``,
    ``bn1``, ``conv2``, ``bn2``, ``shortcut`` (identity, :class:`PadShortcut` or 1×1 conv + BN),
    ``preact`` (identity on the pre-ReLU sum, a tap point).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + self.shortcut(x)))


def make_stage(in_channels: int, out_channels: int, blocks: int, stride: int,
               shortcut: str) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one changes width/resolution."""
    layers = [BasicBlock(in_channels, out_channels, stride, shortcut)]
    layers += [BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def check_shortcut(shortcut: str) -> str:
    option = str(shortcut).upper()
    if option not in SHORTCUTS:
        raise KDGuardError(f"ResNet shortcut {shortcut!r} is not supported",
                           "use 'B' (1×1 conv + BN projection) or 'A' (zero padding, the paper's "
                           "CIFAR choice)")
    return option


class ResNetCIFAR(nn.Module):
    """The 6n+2-layer CIFAR ResNet (He et al. 2016, §4.2, widths 16/32/64).

    Args:
        depth: total layer count 6n+2 (8, 20, 32, 44, 56, 110, ...).
        num_classes: logits per image (``>= 2``).
        in_channels: 1 or 3.
        mean, std: dataset statistics in the 0–1 scale (see :func:`check_model_args`).
        shortcut: ``"B"`` (default, 1×1 conv projection as in CRD/RepDistiller) or ``"A"``
            (zero padding, as in the paper).

    Input ``float N×C×H×W`` in ``[0, 1]`` (any H, W ≥ 8; 32×32 and 28×28 tested) → logits
    ``N×num_classes``. Stage outputs: ``layer1`` 16×H×W, ``layer2`` 32×H/2×W/2,
    ``layer3`` 64×H/4×W/4; ``penultimate`` the pooled 64-d vector.

    Raises:
        KDGuardError: ``depth`` is not 6n+2 with n ≥ 1, or a bad common argument.
    """

    family = "resnet_cifar"  # selects the stage presets in kdguard.models.stages

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, mean: Stats = None,
                 std: Stats = None, shortcut: str = "B") -> None:
        super().__init__()
        mean, std = check_model_args(num_classes, in_channels, mean, std)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise KDGuardError(f"CIFAR ResNet depth {depth!r} is not of the form 6n+2",
                               "use 8, 20, 32, 44, 56 or 110")
        shortcut = check_shortcut(shortcut)
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_stage(16, 16, n, 1, shortcut)
        self.layer2 = make_stage(16, 32, n, 2, shortcut)
        self.layer3 = make_stage(32, 64, n, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.penultimate = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        self.feature_dim = 64
        self.arch = f"resnet{depth}"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.penultimate(self.pool(x)))


def _resnet(depth: int):
    def factory(num_classes: int, in_channels: int = 3, mean: Stats = None, std: Stats = None,
                shortcut: str = "B") -> ResNetCIFAR:
        return ResNetCIFAR(depth, num_classes, in_channels, mean, std, shortcut)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = (f"CIFAR ResNet-{depth} (He et al. 2016 §4.2, n={(depth - 2) // 6}); "
                       f"see :class:`ResNetCIFAR`.")
    return factory


resnet8 = _resnet(8)
resnet20 = _resnet(20)
resnet32 = _resnet(32)
resnet56 = _resnet(56)
