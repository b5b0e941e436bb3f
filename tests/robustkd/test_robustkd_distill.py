"""RobustKD distillation: OFD against the *detoxified* teacher, CE, salt-and-pepper noise."""

from __future__ import annotations

import pytest
import torch

from kdguard.defenses.robustkd import (FeatureDetox, RobustKDDistiller, align_stages, get_pair,
                                       salt_and_pepper)
from kdguard.defenses.robustkd.presets import PAIRS
from kdguard.errors import KDGuardError
from kdguard.models import build_model


def _detox(value: float = 1.0) -> FeatureDetox:
    detox = FeatureDetox({"bn1": (8, 8, 8), "bn2": (16, 4, 4)}, granularity="channel")
    with torch.no_grad():
        for s in detox.stages:
            s.set_mask(value)
            s.replacement.fill_(0.25)
    return detox


def test_salt_and_pepper_noise():
    x = torch.rand(4, 3, 16, 16) * 0.5 + 0.25  # no pixel is 0 or 1 before the noise
    assert torch.equal(salt_and_pepper(x, 0.0), x)
    full = salt_and_pepper(x, 1.0)
    assert set(full.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(full[:, 0], full[:, 1]) and torch.equal(full[:, 1], full[:, 2])  # whole pixels
    torch.manual_seed(0)
    part = salt_and_pepper(torch.rand(64, 1, 32, 32) * 0.5 + 0.25, 0.1)
    hit = ((part == 0) | (part == 1)).float().mean().item()
    assert 0.08 < hit < 0.12
    with pytest.raises(KDGuardError, match="density"):
        salt_and_pepper(x, 1.5)
    with pytest.raises(KDGuardError, match="float images"):
        salt_and_pepper(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 0.1)


def test_ofd_targets_are_the_detoxified_features(bn_pair):
    d = RobustKDDistiller(bn_pair.student, bn_pair.teacher, _detox(1.0), input_shape=bn_pair.shape)
    assert d.pairs == [("bn1", "bn1"), ("bn2", "bn2")] and d.margin_used == "bn"
    _, feats = d._t_taps(torch.rand(2, *bn_pair.shape))
    assert torch.all(feats["bn1"] == 0.25) and torch.all(feats["bn2"] == 0.25)  # M = 1: all P
    d.close()


def test_training_step_grads_and_teacher_mode(bn_pair):
    detox = _detox(0.5)
    d = RobustKDDistiller(bn_pair.student, bn_pair.teacher, detox, input_shape=bn_pair.shape, noise=0.1)
    d.train()
    assert not d.teacher.training and d.student.training
    x, y = torch.rand(6, *bn_pair.shape), torch.arange(6) % 4
    logits, losses = d(x, y)
    assert set(losses) == {"ce", "ofd"} and logits.shape == (6, 4)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.student.parameters())
    assert all(p.grad is not None for p in d.ofd.parameters())  # connectors learn
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in detox.parameters())  # M, P frozen during distillation
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not trainable & {id(p) for p in detox.parameters()}
    d.eval()
    assert d(x).shape == (6, 4)
    d.close()


def test_close_restores_the_teacher_and_no_detox_is_plain_ofd(bn_pair):
    x = torch.rand(3, *bn_pair.shape)
    original = bn_pair.teacher(x)
    d = RobustKDDistiller(bn_pair.student, bn_pair.teacher, _detox(1.0), input_shape=bn_pair.shape)
    assert not torch.allclose(bn_pair.teacher(x), original)
    d.close()
    assert torch.equal(bn_pair.teacher(x), original)
    plain = RobustKDDistiller(bn_pair.cls(width=4), bn_pair.teacher, None, input_shape=bn_pair.shape)
    _, feats = plain._t_taps(x)
    assert not torch.all(feats["bn2"] == 0.25)
    plain.close()


def test_kd_method_uses_the_detoxified_logits(bn_pair):
    detox = _detox(1.0)
    d = RobustKDDistiller(bn_pair.student, bn_pair.teacher, detox, input_shape=bn_pair.shape, method="kd",
                          kd_weight=0.9, ce_weight=0.1)
    d.train()
    _, losses = d(torch.rand(4, *bn_pair.shape), torch.zeros(4, dtype=torch.long))
    assert set(losses) == {"ce", "kd"} and d.ofd is None
    d.close()


def test_ce_only_baseline_never_runs_the_teacher(bn_pair):
    calls = []
    handle = bn_pair.teacher.register_forward_hook(lambda *a: calls.append(1))
    d = RobustKDDistiller(bn_pair.student, bn_pair.teacher, None, input_shape=bn_pair.shape, method="kd",
                          kd_weight=0.0, ce_weight=1.0)
    d.train()
    _, losses = d(torch.rand(4, *bn_pair.shape), torch.zeros(4, dtype=torch.long))
    assert set(losses) == {"ce"} and not calls
    with pytest.raises(KDGuardError, match="no loss"):
        d(torch.rand(4, *bn_pair.shape), None)
    d.close()
    handle.remove()


def test_margin_auto_falls_back_without_batchnorm():
    teacher = build_model("lenet5", num_classes=10, in_channels=1).eval()
    student = build_model("lenet5", num_classes=10, in_channels=1)
    d = RobustKDDistiller(student, teacher, None, input_shape=(1, 28, 28))
    assert d.margin_used == "none" and d.pairs == [("block1.conv", "block1.conv"), ("block2.conv", "block2.conv")]
    d.close()
    with pytest.raises(KDGuardError, match="BatchNorm"):
        RobustKDDistiller(build_model("lenet5", num_classes=10, in_channels=1), teacher, None,
                          input_shape=(1, 28, 28), margin="bn")


def test_align_stages_by_resolution():
    pairs = align_stages(["l1", "l2", "l3", "l4"], [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
                         ["b1", "b2", "b3"], [(64, 16, 16), (128, 8, 8), (256, 4, 4)])
    assert pairs == [("l2", "b1"), ("l3", "b2"), ("l4", "b3")]
    with pytest.raises(KDGuardError, match="resolution"):
        align_stages(["l1", "l2"], [(4, 8, 8), (8, 4, 4)], ["b"], [(4, 5, 5)])


def test_bad_distiller_options(bn_pair):
    with pytest.raises(KDGuardError, match="method"):
        RobustKDDistiller(bn_pair.student, bn_pair.teacher, None, input_shape=bn_pair.shape, method="fitnet")
    with pytest.raises(KDGuardError, match="margin"):
        RobustKDDistiller(bn_pair.student, bn_pair.teacher, None, input_shape=bn_pair.shape, margin="soft")
    with pytest.raises(KDGuardError, match="density"):
        RobustKDDistiller(bn_pair.student, bn_pair.teacher, None, input_shape=bn_pair.shape, noise=-0.1)


def test_pair_presets_build_and_the_unavailable_ones_say_so():
    for name, pair in PAIRS.items():
        if pair.available:
            assert get_pair(name.replace("_", "-")) == pair
    assert get_pair("cpu_resnet").teacher == "resnet20" and get_pair("paper_c").student == "wrn16_2"
    with pytest.raises(KDGuardError, match="does not build"):
        get_pair("paper_e")
    with pytest.raises(KDGuardError, match="unknown RobustKD pair"):
        get_pair("paper_z")


@pytest.mark.parametrize("pair_name", ["cpu_resnet", "cpu_wrn", "paper_test_b"])
def test_pairs_wire_up_with_their_presets(pair_name):
    pair = get_pair(pair_name)
    teacher = build_model(pair.teacher, num_classes=10).eval()
    student = build_model(pair.student, num_classes=10)
    d = RobustKDDistiller(student, teacher, None, input_shape=(3, 16, 16))
    assert d.margin_used == "bn" and len(d.pairs) == 3  # WRN-28-4 (3 stages) → ResNet-18 (4): by resolution
    if pair_name == "paper_test_b":
        assert [s for s, _ in d.pairs] == ["layer1.1.preact", "layer2.1.preact", "layer3.1.preact"]
    d.train()
    _, losses = d(torch.rand(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.isfinite(losses["ofd"]) and losses["ofd"] > 0
    d.close()
