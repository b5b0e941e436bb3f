"""The NAD student objective: CE + β-weighted attention terms, frozen teacher, stage pairing."""

from __future__ import annotations

import pytest
import torch

from kdguard.defenses import NADDistiller, default_betas
from kdguard.errors import KDGuardError
from kdguard.losses.attention import attention_loss
from kdguard.models import build_model, stage_paths
from kdguard.taps import FeatureTaps


def _pair(student_arch="resnet8", teacher_arch="resnet8"):
    torch.manual_seed(0)
    student = build_model(student_arch, num_classes=4)
    teacher = build_model(teacher_arch, num_classes=4)
    return student, teacher


def test_default_betas_follow_nad():
    assert default_betas(3) == [500.0, 1000.0, 1000.0]
    assert default_betas(2) == [500.0, 1000.0] and default_betas(4) == [500.0, 1000.0, 1000.0, 1000.0]


def test_student_loss_has_ce_and_weighted_at_and_no_teacher_gradient():
    student, teacher = _pair()
    paths = stage_paths(student, "stages")
    d = NADDistiller(student, teacher, student_paths=paths, teacher_paths=paths).train()
    assert d.betas == [500.0, 1000.0, 1000.0]
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, losses = d(x, y)
    assert set(losses) == {"ce", "at"} and logits.shape == (4, 4)
    assert losses["at"] > 0 and torch.isfinite(losses["ce"])
    assert not teacher.training  # the teacher stays in eval mode inside a training distiller
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_at_term_is_the_beta_weighted_sum_of_nad_attention_losses():
    student, teacher = _pair()
    paths = stage_paths(student, "stages")
    d = NADDistiller(student, teacher, student_paths=paths, teacher_paths=paths, betas=[2.0, 0.0, 5.0]).train()
    x = torch.rand(3, 3, 32, 32)
    _, losses = d(x, None)
    assert set(losses) == {"at"}  # no labels: no CE term
    with torch.no_grad(), FeatureTaps(student, paths) as s_taps, FeatureTaps(teacher, paths) as t_taps:
        _, s_feats = s_taps(x)  # student still in train mode: same BN behaviour as in the distiller
        _, t_feats = t_taps(x)
    want = sum(b * attention_loss(s_feats[p], t_feats[p], variant="nad")
               for b, p in zip([2.0, 0.0, 5.0], paths))
    assert losses["at"].item() == pytest.approx(want.item(), rel=1e-5)


def test_identical_models_give_zero_attention_loss():
    student, _ = _pair()
    teacher = build_model("resnet8", num_classes=4)
    teacher.load_state_dict(student.state_dict())
    paths = stage_paths(student, "stages")
    d = NADDistiller(student, teacher, student_paths=paths, teacher_paths=paths)
    d.train()
    student.eval()  # same BN statistics as the eval-mode teacher
    _, losses = d.forward_train(torch.rand(2, 3, 32, 32), None)
    assert losses["at"].item() == pytest.approx(0.0, abs=1e-10)


def test_other_student_architecture_pairs_stages_and_pools_maps():
    student, teacher = _pair("resnet8", "wrn16_1")
    d = NADDistiller(student, teacher, student_paths=stage_paths(student), teacher_paths=stage_paths(teacher))
    _, losses = d.train()(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(losses["at"]) and losses["at"] > 0


def test_hooks_come_off():
    student, teacher = _pair()
    paths = stage_paths(student, "stages")
    d = NADDistiller(student, teacher, student_paths=paths, teacher_paths=paths)
    d.remove_hooks()
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(betas=[1.0, 2.0]), "2 betas for 3 stages"),
    (dict(betas=[1.0, -1.0, 1.0]), "must be finite numbers >= 0"),
    (dict(betas=[1.0, float("inf"), 1.0]), "must be finite numbers >= 0"),
    (dict(variant="nadd"), "unknown attention-transfer variant"),
    (dict(p=0.0), "must be > 0"),
    (dict(teacher_paths=["layer1"]), "3 student and 1 teacher stages"),
    (dict(student_paths=["layer1", "layer2", "layer9"]), "does not exist"),
])
def test_bad_options_are_one_line_errors(kwargs, fragment):
    student, teacher = _pair()
    paths = stage_paths(student, "stages")
    args = {"student_paths": paths, "teacher_paths": paths, **kwargs}
    with pytest.raises(KDGuardError, match=fragment):
        NADDistiller(student, teacher, **args)
