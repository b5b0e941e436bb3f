"""Feature detoxification: the hook edits exactly the chosen stages, M = 0 is the identity,
gradients reach only M and P while detoxifying, and saved masks reproduce the teacher."""

from __future__ import annotations

import pytest
import torch

from kdguard.defenses.robustkd import (FeatureDetox, StageDetox, clean_feature_stats, detoxify,
                                       normalized_variance)
from kdguard.errors import KDGuardError
from kdguard.taps import FeatureTaps

ALL = ["conv1", "bn1", "conv2", "bn2", "fc"]


def _outputs(model, x):
    with torch.no_grad(), FeatureTaps(model, ALL, detach=True) as taps:
        return taps(x)


def test_hook_edits_exactly_the_chosen_stage(bn_pair):
    model = bn_pair.teacher
    x = torch.rand(4, *bn_pair.shape)
    _, before = _outputs(model, x)
    detox = FeatureDetox({"bn1": (8, 8, 8)}, granularity="channel")
    mask = torch.rand(8, 1, 1)
    detox.stage("bn1").set_mask(mask)
    with torch.no_grad():
        detox.stage("bn1").replacement.normal_()
    with detox.attach(model):
        _, after = _outputs(model, x)
    assert torch.equal(after["conv1"], before["conv1"])  # upstream: untouched
    expected = (1 - mask) * before["bn1"] + mask * detox.stage("bn1").replacement.detach()
    torch.testing.assert_close(after["bn1"], expected)  # the stage: (1 − M)F + MP
    assert not torch.allclose(after["conv2"], before["conv2"])  # downstream sees the edit
    _, removed = _outputs(model, x)
    assert all(torch.equal(removed[k], before[k]) for k in ALL)  # hooks gone: model as before


def test_additive_combine_and_element_masks(bn_pair):
    stage = StageDetox((8, 8, 8), granularity="element", combine="additive", init_mask=0.5,
                       replacement=torch.ones(8, 8, 8))
    assert stage.mask_logits.shape == (8, 8, 8)
    f = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(stage(f), f + 0.5)


def test_zero_mask_is_the_identity(bn_pair):
    model = bn_pair.teacher
    x = torch.rand(4, *bn_pair.shape)
    reference = model(x)
    detox = FeatureDetox({"bn1": (8, 8, 8), "bn2": (16, 4, 4)}, granularity="element")
    with torch.no_grad():
        for s in detox.stages:
            s.replacement.normal_(0, 10)
            s.set_mask(0.0)
    assert all(bool((m == 0).all()) for m in detox.masks().values())
    with detox.attach(model):
        assert torch.equal(model(x), reference)


def test_disabled_hooks_pass_outputs_through(bn_pair):
    model = bn_pair.teacher
    x = torch.rand(2, *bn_pair.shape)
    original = model(x)
    detox = FeatureDetox({"bn2": (16, 4, 4)}, init_mask=0.9)
    with detox.attach(model) as hooks:
        edited = model(x)
        hooks.enabled = False
        plain = model(x)
    assert not torch.allclose(edited, original)
    assert torch.equal(plain, original)


def test_clean_stats_give_mean_maps_and_variances(bn_pair):
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    stats = clean_feature_stats(bn_pair.teacher, ["bn2"], images, batch_size=3)
    _, feats = _outputs(bn_pair.teacher, images.float() / 255)
    f = feats["bn2"].double()
    torch.testing.assert_close(stats["bn2"].mean, f.mean(0).float(), rtol=1e-5, atol=1e-5)
    a = f.clamp_min(0)
    torch.testing.assert_close(stats["bn2"].var_channel, a.transpose(0, 1).flatten(1).var(1, unbiased=False).float(),
                               rtol=1e-4, atol=1e-6)
    v = normalized_variance(stats["bn2"], "channel")
    assert v.shape == (16, 1, 1) and float(v.mean()) == pytest.approx(1.0, rel=1e-4)
    detox = FeatureDetox.from_stats(stats)
    torch.testing.assert_close(detox.replacements()["bn2"], stats["bn2"].mean)


def test_gradients_reach_only_mask_and_replacement(bn_pair):
    model = bn_pair.teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    model.train()  # detoxify must run it in eval mode and give the mode back
    result = detoxify(model, images, labels, paths=["bn1", "bn2"], epochs=2, batch_size=16, lr=0.1)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    init = FeatureDetox.from_stats(result.stats, granularity="channel")
    assert not torch.equal(result.detox.stage("bn1").mask_logits, init.stage("bn1").mask_logits)
    assert not torch.equal(result.detox.stage("bn2").replacement, init.stage("bn2").replacement)
    assert not any(p.requires_grad for p in result.detox.parameters())  # frozen after detox
    assert len(result.history) == 2 and {"ce", "kd", "sparsity", "variance", "masked"} <= set(result.history[0])


def test_saved_masks_reproduce_the_detoxified_teacher(bn_pair, tmp_path):
    model = bn_pair.teacher
    x = torch.rand(5, *bn_pair.shape)
    detox = FeatureDetox({"bn1": (8, 8, 8), "bn2": (16, 4, 4)}, granularity="element", init_mask=0.3)
    with torch.no_grad():
        for s in detox.stages:
            s.mask_logits.normal_()
            s.replacement.normal_()
        detox.stage("bn2").set_mask(1.0)  # ±inf logits survive the round trip
    with detox.attach(model):
        expected = model(x)
    path = detox.save(tmp_path / "detox.safetensors", {"teacher": "t"})
    loaded = FeatureDetox.load(tmp_path)  # a run directory works too
    assert loaded.paths == detox.paths and loaded.granularity == "element" and loaded.metadata == {"teacher": "t"}
    with loaded.attach(model):
        assert torch.equal(model(x), expected)
    assert path.exists() and not any(p.requires_grad for p in loaded.parameters())


def test_binarize_and_summary():
    detox = FeatureDetox({"a": (4, 1, 1)}, granularity="channel")
    detox.stage("a").set_mask(torch.tensor([0.1, 0.6, 0.9, 0.4]).view(4, 1, 1))
    detox.binarize(0.5)
    assert detox.channel_masks()["a"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert detox.summary()["a"]["fraction_masked"] == 0.5


@pytest.mark.parametrize("make, fragment", [
    (lambda: FeatureDetox({}), "no stages"),
    (lambda: FeatureDetox({"a": (4, 2)}), "not C×H×W"),
    (lambda: FeatureDetox({"a": (4, 2, 2)}, granularity="pixel"), "granularity"),
    (lambda: FeatureDetox({"a": (4, 2, 2)}, combine="mul"), "combine"),
    (lambda: FeatureDetox({"a": (4, 2, 2)}, init_mask=1.0), "init_mask"),
    (lambda: StageDetox((4, 2, 2), replacement=torch.zeros(3, 2, 2)), "does not match"),
    (lambda: StageDetox((4, 2, 2))(torch.zeros(1, 4, 3, 3)), "got (1, 4, 3, 3)"),
    (lambda: StageDetox((4, 2, 2)).set_mask(2.0), "[0, 1]"),
])
def test_bad_input_is_a_one_line_error(make, fragment):
    with pytest.raises(KDGuardError) as err:
        make()
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_attach_and_load_errors(bn_pair, tmp_path):
    with pytest.raises(KDGuardError, match="does not exist"):
        FeatureDetox({"layer9": (8, 8, 8)}).attach(bn_pair.teacher)
    with pytest.raises(KDGuardError, match="does not exist"):
        FeatureDetox.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KDGuardError, match="not a kdguard detox file"):
        FeatureDetox.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(KDGuardError, match="cannot read"):
        FeatureDetox.load(tmp_path / "junk.safetensors")
