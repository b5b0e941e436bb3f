"""Model registry: names, aliases, generic WRN names, import-path factories and errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from kdguard.errors import KDGuardError
from kdguard.models import MODELS, STAGE_PRESETS, build_model, model_info
from kdguard.models.wrn import WideResNet


@pytest.mark.parametrize("alias, canonical", [
    ("wrn-16-2", "wrn16_2"), ("WRN_16_2", "wrn16_2"), ("lenet", "lenet5"), ("LeNet-5", "lenet5"),
    ("resnet-18", "resnet18"), ("ResNet20", "resnet20"), ("mobilenet_v2", "mobilenetv2")])
def test_aliases_resolve_to_canonical_arch(alias, canonical):
    assert build_model(alias, num_classes=10).arch == canonical


def test_every_registered_model_has_a_family_with_presets():
    for name in MODELS.names():
        info = model_info(name)
        assert info["family"] in STAGE_PRESETS and info["description"]


def test_generic_wrn_name_builds_that_depth_and_width():
    model = build_model("wrn-22-3", num_classes=10)
    assert isinstance(model, WideResNet) and model.arch == "wrn22_3"
    assert [len(model.block1), len(model.block2), len(model.block3)] == [3, 3, 3]
    assert model.block3[0].conv1.out_channels == 64 * 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_arch_and_options_rebuild_the_same_architecture():
    model = build_model("resnet20", num_classes=10, shortcut="A")
    again = build_model(model.arch, num_classes=10, **model.arch_options)
    again.load_state_dict(model.state_dict())  # strict: same keys and shapes
    assert model.arch_options == {"shortcut": "A"}
    with pytest.raises(RuntimeError):  # the default (option B) has projection weights
        build_model("resnet20", num_classes=10).load_state_dict(model.state_dict())


@pytest.mark.parametrize("name, kwargs, match", [
    ("resnet21", {}, "did you mean"),
    ("", {}, "non-empty"),
    ("wrn-15-2", {}, "6N\\+4"),
    ("resnet20", {"num_classes": 1}, "num_classes 1"),
    ("resnet20", {"num_classes": 2.5}, "num_classes 2.5"),
    ("resnet20", {"num_classes": True}, "num_classes True"),
    ("resnet20", {"in_channels": 2}, "in_channels 2"),
    ("resnet20", {"mean": (0.1, 0.2)}, "2 values for 3"),
    ("resnet20", {"std": (0.2, 0.0, 0.2)}, "<= 0"),
    ("resnet20", {"mean": "abc"}, "mean"),
    ("resnet20", {"shortcut": "C"}, "shortcut 'C'"),
    ("resnet20", {"depth": 3}, "option\\(s\\) 'depth'"),
    ("mobilenetv2", {"width_mult": 0}, "width_mult"),
])
def test_bad_arguments_raise_kdguard_error(name, kwargs, match):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(KDGuardError, match=match):
        build_model(name, **kwargs)


@pytest.fixture
def user_module(monkeypatch):
    """A fake user package importable as ``kdg_user_nets``."""
    mod = types.ModuleType("kdg_user_nets")

    def tiny(num_classes, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    def fixed():  # accepts nothing: called without arguments
        return nn.Linear(3, 2)

    def everything(**kwargs):
        model = nn.Identity()
        model.kwargs = kwargs
        return model

    mod.tiny = tiny
    mod.fixed = fixed
    mod.everything = everything
    mod.not_a_module = lambda num_classes: 42
    mod.CONSTANT = 3
    monkeypatch.setitem(sys.modules, "kdg_user_nets", mod)
    return mod


def test_import_path_factory_gets_sizes_it_accepts(user_module):
    model = build_model("kdg_user_nets:tiny", num_classes=6, in_channels=1)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 6)
    assert model.arch == "kdg_user_nets:tiny"
    assert isinstance(build_model("kdg_user_nets:fixed", num_classes=6), nn.Linear)
    got = build_model("kdg_user_nets:everything", num_classes=4, mean=0.5, width=2).kwargs
    assert got == {"num_classes": 4, "in_channels": 3, "mean": 0.5, "width": 2}


def test_import_path_to_builtin_factory():
    model = build_model("kdguard.models.lenet:lenet5", num_classes=10, in_channels=1)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10) and model.arch == "lenet5"


@pytest.mark.parametrize("path, match", [
    ("kdg_no_such_package.nets:f", "cannot import module 'kdg_no_such_package.nets'"),
    ("kdg_user_nets:missing", "has no attribute 'missing'"),
    ("kdg_user_nets:CONSTANT", "not callable"),
    ("kdg_user_nets:not_a_module", "returned a value of type int, not an nn.Module"),
    ("kdg_user_nets:", "package.module:factory"),
    ("kdg_user_nets:tiny", "option\\(s\\) 'bogus'"),
])
def test_bad_import_paths_raise_kdguard_error(user_module, path, match):
    options = {"bogus": 1} if path == "kdg_user_nets:tiny" else {}
    with pytest.raises(KDGuardError, match=match):
        build_model(path, num_classes=10, **options)
