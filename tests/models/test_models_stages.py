"""Stage presets: paths exist, taps give the expected shapes, and pre-ReLU taps are what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdguard.errors import KDGuardError
from kdguard.models import MODELS, PRESET_KINDS, build_model, stage_paths
from kdguard.taps import FeatureTaps

# Channels of the "stages" preset per architecture (from the papers' width tables).
STAGE_CHANNELS = {
    "resnet8": [16, 32, 64], "resnet20": [16, 32, 64], "resnet32": [16, 32, 64],
    "resnet56": [16, 32, 64], "resnet18": [64, 128, 256, 512],
    "wrn16_1": [16, 32, 64], "wrn40_1": [16, 32, 64], "wrn16_2": [32, 64, 128],
    "wrn28_2": [32, 64, 128], "wrn40_2": [32, 64, 128], "wrn16_4": [64, 128, 256],
    "wrn28_4": [64, 128, 256],
    "mobilenetv2": [24, 32, 96, 320], "mobilenetv2_x0_5": [16, 16, 48, 160],
    "vgg11_bn": [64, 128, 256, 512, 512], "vgg13_bn": [64, 128, 256, 512, 512],
    "vgg16_bn": [64, 128, 256, 512, 512], "vgg19_bn": [64, 128, 256, 512, 512],
    "lenet5": [6, 16],
}


def test_table_covers_every_registered_model():
    assert sorted(STAGE_CHANNELS) == MODELS.names()


@pytest.mark.parametrize("name", sorted(STAGE_CHANNELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_stage_taps_are_4d_with_expected_channels_and_shrinking(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[0]).eval()
    paths = stage_paths(model)
    assert paths == stage_paths(name)  # by name (structure-only build) = by instance
    with torch.no_grad(), FeatureTaps(model, paths) as taps:
        logits, feats = taps(torch.rand(2, *shape))
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats.values()] == STAGE_CHANNELS[name]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats.values())
    sizes = [f.shape[-1] for f in feats.values()]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def _tap(model, paths, x):
    with torch.no_grad(), FeatureTaps(model, paths) as taps:
        return taps(x)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg11_bn", "lenet5"])
def test_pre_relu_taps_are_the_stage_outputs_before_relu(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    stages, pre = stage_paths(model), stage_paths(model, "pre_relu")
    _, feats = _tap(model, stages + pre, torch.rand(2, 3, 32, 32))
    for stage, tap in zip(stages, pre):
        act = F.relu(feats[tap])
        if name == "lenet5":  # conv → ReLU → max-pool
            act = F.max_pool2d(act, 2)
        assert torch.allclose(act, feats[stage], atol=1e-6)
        assert (feats[tap] < 0).any()  # genuinely before the ReLU


def test_wrn_pre_relu_taps_are_the_next_bn_of_each_group_output():
    torch.manual_seed(0)
    model = build_model("wrn16_2", num_classes=10).eval()
    for bn in (model.block2[0].bn1, model.block3[0].bn1, model.bn_final):  # non-trivial stats
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    stages, pre = stage_paths(model), stage_paths(model, "pre_relu")
    assert pre == ["block2.0.bn1", "block3.0.bn1", "bn_final"]
    _, feats = _tap(model, stages + pre, torch.rand(2, 3, 32, 32))
    for stage, tap in zip(stages, pre):
        assert torch.allclose(model.get_submodule(tap)(feats[stage]), feats[tap], atol=1e-5)


@pytest.mark.parametrize("name", ["resnet8", "wrn16_1", "mobilenetv2_x0_5", "vgg11_bn"])
def test_pre_relu_bn_paths_are_batchnorms_matching_the_taps(name):
    model = build_model(name, num_classes=10).eval()
    pre, bns = stage_paths(model, "pre_relu"), stage_paths(model, "pre_relu_bn")
    _, feats = _tap(model, pre, torch.rand(2, 3, 32, 32))
    assert len(bns) == len(pre)
    for bn_path, feat in zip(bns, feats.values()):
        bn = model.get_submodule(bn_path)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == feat.shape[1]


@pytest.mark.parametrize("name", ["resnet8", "wrn16_1", "mobilenetv2_x0_5", "vgg11_bn", "lenet5"])
def test_penultimate_feeds_the_classifier(name):
    model = build_model(name, num_classes=10).eval()
    (pen,) = stage_paths(model, "penultimate")
    (fc,) = stage_paths(model, "classifier")
    logits, feats = _tap(model, [pen], torch.rand(2, 3, 32, 32))
    assert feats[pen].shape == (2, model.feature_dim)
    assert torch.allclose(model.get_submodule(fc)(feats[pen]), logits, atol=1e-6)


def test_user_presets_and_errors():
    with pytest.raises(KDGuardError, match="unknown stage preset 'stage'"):
        stage_paths("resnet20", "stage")
    with pytest.raises(KDGuardError, match="no 'pre_relu_bn' preset"):
        stage_paths("lenet5", "pre_relu_bn")
    with pytest.raises(KDGuardError, match="unknown model"):
        stage_paths("resnet21")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert stage_paths(plain) == ["1"]  # traced: the last module returning at 30×30
    with pytest.raises(KDGuardError, match="runs no nn.Linear classifier.*stage_presets"):
        stage_paths(plain, "classifier")
    plain.stage_presets = {"stages": ["0"]}
    assert stage_paths(plain) == ["0"]
    with pytest.raises(KDGuardError, match="no 'pre_relu' preset"):
        stage_paths(plain, "pre_relu")
    plain.stage_presets = {"stages": ["5"]}
    with pytest.raises(KDGuardError, match="module path '5' does not exist"):
        stage_paths(plain)


def test_preset_kinds_are_documented_and_wrappers_unwrapped():
    assert set(PRESET_KINDS) == {"stages", "pre_relu", "pre_relu_bn", "penultimate", "classifier"}
    model = build_model("resnet8", num_classes=10)
    assert stage_paths(nn.DataParallel(model), "pre_relu") == stage_paths(model, "pre_relu")
