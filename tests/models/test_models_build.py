"""Every registered architecture builds, runs on CIFAR- and MNIST-shaped input, and normalises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdguard.errors import KDGuardError
from kdguard.models import MODELS, Normalize, build_model
from kdguard.models.resnet_cifar import PadShortcut

ALL = MODELS.names()
# Small enough for a backward pass in a unit test; the others are checked forward-only.
SMALL = ["resnet8", "resnet20", "wrn16_1", "mobilenetv2_x0_5", "lenet5"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_builds_for_cifar_and_mnist_shapes(name):
    torch.manual_seed(0)
    cifar = build_model(name, num_classes=10).eval()
    mnist = build_model(name, num_classes=7, in_channels=1, mean=0.1307, std=0.3081).eval()
    with torch.no_grad():
        out_c = cifar(torch.rand(2, 3, 32, 32))
        out_m = mnist(torch.rand(2, 1, 28, 28))
    assert out_c.shape == (2, 10) and out_m.shape == (2, 7)
    assert torch.isfinite(out_c).all() and torch.isfinite(out_m).all()
    assert cifar.arch == name and isinstance(cifar.normalize, Normalize)
    assert isinstance(cifar.fc, nn.Linear) and cifar.fc.in_features == cifar.feature_dim


# Published sizes: He et al. 2016 Table 6 (ResNet-20 0.27M), CRD/RepDistiller (ResNet-8 0.078M
# with 1×1 projections), Zagoruyko & Komodakis 2016 (WRN-16-2 0.69M, WRN-40-2 2.2M), ResNet-18
# CIFAR 11.2M; all with 10 classes.
@pytest.mark.parametrize("name, published", [
    ("resnet20", 0.27e6), ("resnet8", 0.078e6), ("wrn16_2", 0.69e6), ("wrn40_2", 2.2e6),
    ("resnet18", 11.2e6), ("vgg16_bn", 14.7e6), ("mobilenetv2", 2.24e6)])
def test_parameter_counts_match_published(name, published):
    count = n_params(build_model(name, num_classes=10))
    assert abs(count - published) / published < 0.03, count


def test_option_a_shortcut_is_parameter_free_zero_padding():
    b = build_model("resnet20", num_classes=10)
    a = build_model("resnet20", num_classes=10, shortcut="A")
    # Option B adds two 1×1 convs (16→32, 32→64) and their BNs: 16·32 + 32·64 + 2·(32 + 64).
    assert n_params(b) - n_params(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    pad = a.layer2[0].shortcut
    assert isinstance(pad, PadShortcut)
    x = torch.rand(2, 16, 8, 8)
    y = pad(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5)
    loss = nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_normalisation_is_applied_inside_the_model():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)
    before = model(x)
    model.normalize.mean.fill_(0.0)
    assert not torch.allclose(model(x), before)
    # The statistics travel with checkpoints.
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_single_value_stats_broadcast_and_default_maps_to_minus_one_one():
    m = build_model("lenet5", num_classes=10, mean=0.3, std=[0.2])
    assert m.normalize.mean.flatten().tolist() == pytest.approx([0.3] * 3)
    d = build_model("lenet5", num_classes=10, in_channels=1)
    assert torch.allclose(d.normalize(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)).flatten(),
                          torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("bad, match", [
    (torch.rand(3, 32, 32), "unsqueeze"),
    (torch.rand(2, 1, 32, 32), "in_channels=1"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float"),
])
def test_bad_input_gives_clear_error(bad, match):
    with pytest.raises(KDGuardError, match=match):
        build_model("resnet8", num_classes=10)(bad)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_x0_5", "wrn16_1", "vgg11_bn", "lenet5"])
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_wrn_dropout_option_is_used_in_training_only():
    torch.manual_seed(0)
    model = build_model("wrn16_1", num_classes=10, drop_rate=0.5)
    x = torch.rand(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))  # two dropout masks
    model.eval()
    assert torch.allclose(model(x), model(x))
