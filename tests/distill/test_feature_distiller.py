"""FeatureDistiller: frozen eval-mode teacher, hooks registered once, guards and error messages."""

from __future__ import annotations

import pytest
import torch

from kdguard.distill import FeatureDistiller, GuardedTaps, feature_shapes
from kdguard.distill.terms import ATTerm, CRDTerm, DKDTerm, FitNetTerm, KDTerm, OFDTerm
from kdguard.errors import KDGuardError



def _fitnet(student, teacher, tiny):
    return FitNetTerm(feature_shapes(student, tiny.stages, tiny.input_shape),
                      feature_shapes(teacher, tiny.stages, tiny.input_shape))


def test_teacher_stays_frozen_in_eval_mode(pair, batch, tiny):
    student, teacher = pair
    x, y, _ = batch
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages,
                         {"fitnet": (1.0, _fitnet(student, teacher, tiny))}, kd_weight=1.0)
    d.train()
    assert d.training and student.training and not teacher.training
    assert all(not m.training for m in teacher.modules())
    running = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, losses = d(x, y)
    sum(losses.values()).backward()
    assert not teacher.training
    for k, v in teacher.state_dict().items():  # BN running statistics did not move
        assert torch.equal(v, running[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in d.terms["fitnet"].parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.trainable_parameters()}


def test_hooks_registered_once_and_features_released(pair, batch, tiny):
    student, teacher = pair
    x, y, _ = batch
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (1000.0, ATTerm())})
    hooks = lambda m: sum(len(sub._forward_hooks) for sub in m.modules())  # noqa: E731
    assert hooks(student) == hooks(teacher) == 2
    d.train()
    for _ in range(3):
        _, losses = d(x, y)
        sum(losses.values()).backward()
    assert hooks(student) == hooks(teacher) == 2
    assert d._s_taps.features == {} and d._t_taps.features == {}  # no graph kept alive between steps
    d.eval()
    logits = d(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (6, 5)
    student(x)  # passes outside the distiller's own step record nothing
    assert d._s_taps.features == {}
    d.close()
    assert hooks(student) == hooks(teacher) == 0
    with pytest.raises(KDGuardError, match="close"):
        d.train()(x, y)


def test_eval_forward_equals_student(pair, batch, tiny):
    student, teacher = pair
    x, _, _ = batch
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (1.0, ATTerm())}).eval()
    torch.testing.assert_close(d(x), student.eval()(x))


def test_loss_values_match_the_pure_functions(pair, batch, tiny):
    from kdguard.losses import attention_loss, kd_loss
    student, teacher = pair
    x, y, _ = batch
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (7.0, ATTerm(variant="paper"))},
                         ce_weight=0.5, kd_weight=2.0, temperature=3.0).train()
    _, losses = d(x, y)
    # recompute independently with plain forward passes (teacher in eval, student in train)
    feats = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: feats.__setitem__(k, o))
             for k, m in [("s1", student.block1), ("s2", student.block2),
                          ("t1", teacher.block1), ("t2", teacher.block2)]]
    with torch.no_grad():
        t_logits = teacher(x)
        s_logits = student(x)
    for h in hooks:
        h.remove()
    at = (attention_loss(feats["s1"], feats["t1"], variant="paper")
          + attention_loss(feats["s2"], feats["t2"], variant="paper"))
    assert losses["at"].item() == pytest.approx(7.0 * at.item(), rel=1e-5)
    kd = kd_loss(s_logits, t_logits, temperature=3.0)
    assert losses["kd"].item() == pytest.approx(2.0 * kd.item(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(s_logits, y)
    assert losses["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_set_weight_scales_a_term(pair, batch, tiny):
    student, teacher = pair
    x, y, _ = batch
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (1.0, ATTerm())}).train()
    first = d(x, y)[1]["at"].item()
    d.set_weight("at", 0.25)
    assert d(x, y)[1]["at"].item() == pytest.approx(0.25 * first, rel=1e-6)
    d.set_weight("ce", 0.0)
    assert "ce" not in d(x, y)[1]
    with pytest.raises(KDGuardError, match="no loss term"):
        d.set_weight("kd", 1.0)
    with pytest.raises(KDGuardError, match="finite"):
        d.set_weight("at", float("nan"))


def test_unlabelled_batches_skip_ce_and_labels_are_required_where_needed(pair, batch):
    student, teacher = pair
    x, y, _ = batch
    d = FeatureDistiller(student, teacher, terms={"kd": (1.0, KDTerm())}).train()
    assert set(d(x)[1]) == {"kd"}
    dkd = FeatureDistiller(student, teacher, terms={"dkd": (1.0, DKDTerm())}).train()
    assert dkd.needs_labels and set(dkd(x, y)[1]) == {"ce", "dkd"}
    with pytest.raises(KDGuardError, match="labels"):
        dkd(x)


def test_crd_needs_index(pair, batch, tiny):
    student, teacher = pair
    x, y, index = batch
    s_shape = feature_shapes(student, tiny.penultimate, tiny.input_shape)
    t_shape = feature_shapes(teacher, tiny.penultimate, tiny.input_shape)
    d = FeatureDistiller(student, teacher, tiny.penultimate, tiny.penultimate,
                         {"crd": (0.8, CRDTerm(s_shape, t_shape, dataset_size=20, nce_k=5))}).train()
    assert d.needs_index
    with pytest.raises(KDGuardError, match="index"):
        d(x, y)
    assert torch.isfinite(d(x, y, index)[1]["crd"])


def test_terms_with_their_own_paths_share_one_forward(pair, batch, tiny):
    student, teacher = pair
    x, y, _ = batch
    from kdguard.distill.terms import teacher_margins
    s_shapes = feature_shapes(student, tiny.pre_relu, tiny.input_shape)
    t_shapes = feature_shapes(teacher, tiny.pre_relu, tiny.input_shape)
    margins = teacher_margins(teacher, tiny.pre_relu, [s[0] for s in t_shapes])
    ofd = OFDTerm(s_shapes, t_shapes, margins=margins, student_paths=tiny.pre_relu, teacher_paths=tiny.pre_relu)
    d = FeatureDistiller(student, teacher, tiny.stages, tiny.stages,
                         {"at": (1.0, ATTerm()), "ofd": (1.0, ofd)}).train()
    assert d.paths("at") == (tiny.stages, tiny.stages) and d.paths("ofd") == (tiny.pre_relu, tiny.pre_relu)
    calls = []
    handle = teacher.register_forward_pre_hook(lambda m, i: calls.append(1))
    _, losses = d(x, y)
    handle.remove()
    assert len(calls) == 1 and set(losses) == {"ce", "at", "ofd"}


def test_constructor_errors(pair, tiny):
    student, teacher = pair
    with pytest.raises(KDGuardError, match="same object"):
        FeatureDistiller(student, student, tiny.stages, tiny.stages, {"at": (1.0, ATTerm())})
    with pytest.raises(KDGuardError, match="not usable"):
        FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"ce": (1.0, ATTerm())})
    with pytest.raises(KDGuardError, match="1 student and 2 teacher"):
        FeatureDistiller(student, teacher, ["block1"], tiny.stages, {"at": (1.0, ATTerm())})
    with pytest.raises(KDGuardError, match="finite number"):
        FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (-1.0, ATTerm())})
    with pytest.raises(KDGuardError, match="DistillTerm"):
        FeatureDistiller(student, teacher, tiny.stages, tiny.stages, {"at": (1.0, torch.nn.MSELoss())})
    with pytest.raises(KDGuardError, match="no loss terms"):
        FeatureDistiller(student, teacher, ce_weight=0.0)
    with pytest.raises(KDGuardError, match="'kd'"):
        FeatureDistiller(student, teacher, terms={"kd": (1.0, KDTerm())}, kd_weight=1.0)


def test_inplace_overwritten_features_are_recorded_true(batch, tiny):
    """A ReLU(inplace=True) after a tapped BN overwrites the BN's output tensor; the taps keep the
    BN's true (pre-ReLU) output, and distillation through it trains."""
    x, y, _ = batch
    net = tiny.net(inplace_relu=True)
    assert feature_shapes(net, ["block1.bn"], tiny.input_shape) == feature_shapes(
        tiny.net(), ["block1.bn"], tiny.input_shape)
    torch.manual_seed(0)
    student, teacher = tiny.net(inplace_relu=True), tiny.net(width=6)
    d = FeatureDistiller(student, teacher, ["block1.bn"], ["block1.bn"], {"at": (1.0, ATTerm())}).train()
    _, losses = d(x, y)
    losses["at"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    for inplace in (True, False):
        torch.manual_seed(1)
        model = tiny.net(inplace_relu=inplace).eval()
        taps = GuardedTaps(model, ["block1.bn"], detach=True)
        _, feats = taps(x)
        taps.remove()
        assert feats["block1.bn"].min() < 0  # a genuine pre-ReLU feature
        if inplace:
            inplace_feat = feats["block1.bn"]
        else:
            assert torch.equal(inplace_feat, feats["block1.bn"])


def test_dkd_warmup_scales_the_loss_linearly_by_epoch(pair, batch):
    # mdistiller's DKD warm-up: min(epoch / warmup, 1) with 1-based epochs.
    student, teacher = pair
    x, y, _ = batch
    plain = FeatureDistiller(student, teacher, terms={"dkd": (1.0, DKDTerm(warmup_epochs=0))}).train()
    full = plain(x, y)[1]["dkd"].item()
    assert full > 0
    d = FeatureDistiller(student, teacher, terms={"dkd": (1.0, DKDTerm(warmup_epochs=4))}).train()
    assert d(x, y)[1]["dkd"].item() == pytest.approx(full / 4, rel=1e-5)  # before any epoch: epoch 0
    for epoch, share in [(1, 2 / 4), (3, 1.0), (10, 1.0), (0, 1 / 4)]:
        d.on_epoch_start(epoch)
        assert d(x, y)[1]["dkd"].item() == pytest.approx(share * full, rel=1e-5), epoch
    with pytest.raises(KDGuardError, match="warmup_epochs"):
        DKDTerm(warmup_epochs=-1)
