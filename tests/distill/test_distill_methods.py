"""The KD-method registry and build_distiller: every method trains one step; specs, weights, options."""

from __future__ import annotations

import math

import pytest
import torch

from kdguard.distill import KD_METHODS, FeatureDistiller, LogitKD, build_distiller, parse_method
from kdguard.errors import KDGuardError

FEATURE_METHODS = [n for n in KD_METHODS.names() if KD_METHODS.meta(n)["features"] is not None]


@pytest.fixture
def build(pair, tiny):
    """``build(method, **kw)``: build_distiller on the tiny pair with explicit paths per feature kind."""
    paths = {n: tiny.kind_paths[KD_METHODS.meta(n)["features"]] for n in FEATURE_METHODS}

    def _build(method, **kw):
        student, teacher = pair
        kw.setdefault("dataset_size", 20)
        kw.setdefault("num_classes", tiny.num_classes)
        if "crd" in str(method):
            kw.setdefault("nce_k", 8)
        return build_distiller(method, student, teacher, input_shape=tiny.input_shape, student_paths=paths,
                               teacher_paths=paths, **kw)

    return _build


def test_registry_metadata_is_complete():
    expected = {"kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "cc", "correlation", "nst", "afd", "ofd",
                "crd"}
    assert set(KD_METHODS.names()) == expected
    for name in KD_METHODS.names():
        meta = KD_METHODS.meta(name)
        assert meta["description"] and meta["source"] and meta["needs"]
        assert set(meta["needs"]) <= {"logits", "labels", "features", "pre_relu", "penultimate", "index"}
        assert meta["default_weight"] > 0 and math.isfinite(meta["default_weight"])
    assert "index" in KD_METHODS.meta("crd")["needs"]
    assert KD_METHODS.meta("ofd")["features"] == "pre_relu"


@pytest.mark.parametrize("method", sorted(KD_METHODS.names()))
def test_every_method_runs_one_training_step(build, method, pair, batch, tiny):
    x, y, index = batch
    d = build(method)
    assert isinstance(d, FeatureDistiller)
    d.train()
    logits, losses = d(x, y, index)
    assert logits.shape == (6, tiny.num_classes)
    assert set(losses) == {"ce", method}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    student, teacher = pair
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # learnable parts of the method (connectors, embeddings, attention) receive gradients too
    extra = [p for p in d.terms.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in extra)


def test_combination_uses_default_weights_and_logs_each_term(build, batch):
    x, y, _ = batch
    d = build("at+kd")
    assert d.weights == {"at": 1000.0, "kd": 1.0} and d.ce_weight == 1.0
    _, losses = d.train()(x, y)
    assert set(losses) == {"ce", "at", "kd"}


def test_dict_weights_scale_the_terms(build, batch):
    x, y, _ = batch
    base = build({"at": 1.0, "nst": 1.0})
    _, l1 = base.train()(x, y)
    scaled = build({"at": 2.5, "nst": 0.5})
    _, l2 = scaled.train()(x, y)
    assert l2["at"].item() == pytest.approx(2.5 * l1["at"].item(), rel=1e-6)
    assert l2["nst"].item() == pytest.approx(0.5 * l1["nst"].item(), rel=1e-6)
    assert l2["ce"].item() == pytest.approx(l1["ce"].item(), rel=1e-6)
    zero_ce = build({"at": 1.0}, ce_weight=0.0)
    assert "ce" not in zero_ce.train()(x, y)[1]


def test_plain_kd_matches_logit_kd(pair, batch, tiny):
    x, y, _ = batch
    student, teacher = pair
    d = build_distiller("kd", student, teacher, input_shape=tiny.input_shape)
    assert d.weights == {"kd": 0.9} and d.ce_weight == pytest.approx(0.1)
    _, got = d.train()(x, y)
    _, want = LogitKD(student, teacher, temperature=4.0, alpha=0.9).train()(x, y)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-6)


def test_option_routing(build):
    d = build("at+kd", at={"variant": "paper"}, temperature=2.0)
    assert d.terms["at"].variant == "paper" and d.terms["kd"].temperature == 2.0
    assert build("at", p=3.0).terms["at"].p == 3.0
    with pytest.raises(KDGuardError, match="no option 'bogus'"):
        build("at", at={"bogus": 1})
    with pytest.raises(KDGuardError, match="not accepted"):
        build("at+kd", alpha=0.5)
    with pytest.raises(KDGuardError, match="not part of"):
        build("at", kd={"temperature": 2})
    with pytest.raises(KDGuardError, match="variant"):
        build("at", variant="bogus")


def test_parse_method_specs():
    assert parse_method("AT + kd") == ({"at": None, "kd": None}, False)
    assert parse_method({"attention": 10, "kd": 1}) == ({"at": 10.0, "kd": 1.0}, True)
    with pytest.raises(KDGuardError, match="did you mean 'at'"):
        parse_method("att")
    with pytest.raises(KDGuardError, match="twice"):
        parse_method("at+attention")
    with pytest.raises(KDGuardError, match="finite number"):
        parse_method({"at": -1})
    with pytest.raises(KDGuardError, match="empty part"):
        parse_method("at+")
    with pytest.raises(KDGuardError):
        parse_method({})


def test_build_errors(build, pair, tiny):
    student, teacher = pair
    with pytest.raises(KDGuardError, match="dataset_size"):
        build_distiller("crd", student, teacher, input_shape=tiny.input_shape, student_paths=tiny.penultimate,
                        teacher_paths=tiny.penultimate)
    with pytest.raises(KDGuardError, match="num_classes=10"):
        build("kd", num_classes=10)
    with pytest.raises(KDGuardError, match="input_shape"):
        build_distiller("at", student, teacher, input_shape=(8, 8), student_paths=tiny.stages,
                        teacher_paths=tiny.stages)
    with pytest.raises(KDGuardError, match="1 student and 2 teacher"):
        build_distiller("at", student, teacher, input_shape=tiny.input_shape, student_paths=["block1"],
                        teacher_paths=tiny.stages)
    with pytest.raises(KDGuardError, match="does not exist"):
        build_distiller("at", student, teacher, input_shape=tiny.input_shape, student_paths=["nope"],
                        teacher_paths=["block1"])
    with pytest.raises(KDGuardError, match="is a string"):
        build_distiller("at", student, teacher, input_shape=tiny.input_shape, student_paths="block1",
                        teacher_paths=["block1"])
    traced = build_distiller("at", student, teacher, input_shape=tiny.input_shape)  # no presets: traced
    assert "at" in traced.terms
    with pytest.raises(KDGuardError, match="BatchNorm"):  # the paper's margin needs a BN behind the tap
        build_distiller("ofd", student, teacher, input_shape=tiny.input_shape, student_paths=["stem"],
                        teacher_paths=["stem"], margin="bn")
    with pytest.warns(UserWarning, match="OFD distils without the margin"):  # default "auto": warn, no clipping
        d = build_distiller("ofd", student, teacher, input_shape=tiny.input_shape, student_paths=["stem"],
                            teacher_paths=["stem"])
    assert not d.terms["ofd"].use_margin
    with pytest.raises(KDGuardError, match="margin paths"):  # BN named by the user: never a silent fallback
        build_distiller("ofd", student, teacher, input_shape=tiny.input_shape, student_paths=["stem"],
                        teacher_paths=["stem"], margin_paths=["a", "b"])
    d = build_distiller("ofd", student, teacher, input_shape=tiny.input_shape, student_paths=["stem"],
                        teacher_paths=["stem"], margin="none")
    assert not d.terms["ofd"].use_margin


def test_default_paths_from_registry_models(batch, tiny):
    models = pytest.importorskip("kdguard.models")
    torch.manual_seed(0)
    teacher = models.build_model("resnet20", num_classes=tiny.num_classes)
    student = models.build_model("resnet8", num_classes=tiny.num_classes)
    kw = dict(input_shape=tiny.input_shape, num_classes=tiny.num_classes)
    d = build_distiller("at+fitnet+sp+crd+ofd", student, teacher, dataset_size=20, nce_k=4, **kw)
    assert d.paths("at") == (["layer1", "layer2", "layer3"],) * 2
    assert d.paths("fitnet") == (["layer2"], ["layer2"])  # the middle stage
    assert d.paths("sp") == (["layer3"], ["layer3"])      # the last stage
    assert d.paths("crd") == (["penultimate"], ["penultimate"])
    assert d.paths("ofd")[1] == ["layer1.2.preact", "layer2.2.preact", "layer3.2.preact"]
    bn = teacher.get_submodule("layer3.2.bn2")  # OFD margin from the last block's bn2 (reference choice)
    from kdguard.losses import ofd_margin
    torch.testing.assert_close(d.terms["ofd"].margin2, ofd_margin(bn.weight, bn.bias))
    x, y, index = batch
    _, losses = d.train()(x, y, index)
    assert set(losses) == {"ce", "at", "fitnet", "sp", "crd", "ofd"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_logit_kd_alpha_zero_is_ce_alone_without_running_the_teacher(pair, batch):
    x, y, _ = batch
    student, teacher = pair
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        logits, losses = LogitKD(student, teacher, alpha=0.0).train()(x, y)
        assert calls == [] and set(losses) == {"ce"}
        assert losses["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
        with pytest.raises(KDGuardError, match="needs labels"):
            LogitKD(student, teacher, alpha=0.0).train()(x, None)
    finally:
        handle.remove()
