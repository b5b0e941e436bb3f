"""The optimised blended trigger: the blend formula, saving/rebuilding, and an optimisation in
which both the pattern and the mask (kept in [0, 0.2]) are learned over every stage."""

from __future__ import annotations

import json

import pytest
import torch

from kdguard.attacks import build_attack, build_trigger
from kdguard.defenses.robustkd import RobustKDBlend, optimize_blend_trigger
from kdguard.errors import KDGuardError
from kdguard.taps import FeatureTaps

SHAPE = (3, 8, 8)


def _trigger() -> RobustKDBlend:
    g = torch.Generator().manual_seed(1)
    return RobustKDBlend(SHAPE, pattern=torch.rand(SHAPE, generator=g), mask=torch.rand(8, 8, generator=g) * 0.2)


def test_blend_formula_on_float_and_uint8():
    t = _trigger()
    x = torch.rand(2, *SHAPE)
    m, p = t.blend_mask, t.pattern
    torch.testing.assert_close(t(x), (1 - m) * x + m * p)
    u8 = (x * 255).round().to(torch.uint8)
    expected = ((1 - m) * (u8.float() / 255) + m * p).mul(255).round().to(torch.uint8)
    assert torch.equal(t(u8), expected)
    assert t.mask.shape == (1, 8, 8) and t.mask.dtype == torch.bool


def test_params_and_file_rebuild_the_same_trigger(tmp_path):
    t = _trigger()
    x = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    params = json.loads(json.dumps(t.params()))  # what a run manifest stores
    assert params["name"] == "robustkd_blend"
    assert torch.equal(build_trigger(**params)(x), t(x))
    path = t.save(tmp_path / "trigger.safetensors")
    from_file = build_trigger("robustkd_blend", SHAPE, file=str(path))
    assert torch.equal(from_file(x), t(x))
    spec = build_attack("robustkd_blend", SHAPE, target=0, file=str(path))  # usable as an attack
    assert spec.poison_rate == 0.1 and torch.equal(spec.trigger(x), t(x))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(pattern=torch.rand(SHAPE)), "both pattern and mask"),
    (dict(pattern=torch.rand(SHAPE), mask=torch.full((8, 8), 0.3)), "outside [0, 0.2]"),
    (dict(pattern=torch.rand(3, 4, 4), mask=torch.zeros(8, 8)), "pattern has shape"),
    (dict(pattern=torch.rand(SHAPE) + 1, mask=torch.zeros(8, 8)), "pattern values"),
    (dict(pattern=torch.rand(SHAPE), mask=torch.zeros(4, 4)), "mask has shape"),
    (dict(file="nowhere.safetensors"), "does not exist"),
    (dict(file="x", pattern=torch.rand(SHAPE), mask=torch.zeros(8, 8)), "both a file"),
])
def test_bad_trigger_input(kwargs, fragment):
    with pytest.raises(KDGuardError) as err:
        RobustKDBlend(SHAPE, **kwargs)
    assert fragment in str(err.value)


def test_optimisation_learns_pattern_and_mask_over_all_stages(bn_pair):
    model = bn_pair.teacher
    images = torch.randint(0, 256, (64, *SHAPE), dtype=torch.uint8)
    start = RobustKDBlend(SHAPE, seed=0)
    result = optimize_blend_trigger(model, images, paths=["bn1", "bn2"], epochs=6, batch_size=16,
                                    lr=0.05, seed=0, selection_images=32)
    trigger, history = result.trigger, result.history
    mask = trigger.blend_mask
    assert float(mask.min()) >= 0 and float(mask.max()) <= 0.2
    assert not torch.allclose(mask, torch.full_like(mask, 0.1))  # M is learned (inside autograd)
    assert not torch.allclose(trigger.pattern, start.pattern)
    assert history[0]["epoch"] == 0 and history[-1]["loss"] < history[0]["loss"]
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert {p: len(c) for p, c in result.channels.items()} == {"bn1": 1, "bn2": 2}  # 10 % of 8 and 16
    # the loss accumulates over stages: each stage's hijacked channels get closer to its μ^max
    with torch.no_grad(), FeatureTaps(model, ["bn1", "bn2"], detach=True) as taps:
        _, start_f = taps(start(images).float() / 255)
        _, end_f = taps(trigger(images).float() / 255)
    for path in ("bn1", "bn2"):
        ch, target = result.channels[path], result.targets[path]
        before = (start_f[path][:, ch] - target).pow(2).mean()
        after = (end_f[path][:, ch] - target).pow(2).mean()
        assert after < before, path


def test_optimisation_rejects_bad_settings(bn_pair):
    images = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    with pytest.raises(KDGuardError, match="top_fraction"):
        optimize_blend_trigger(bn_pair.teacher, images, paths=["bn1"], top_fraction=0.0, epochs=1)
    with pytest.raises(KDGuardError, match="epochs"):
        optimize_blend_trigger(bn_pair.teacher, images, paths=["bn1"], epochs=0)
    with pytest.raises(KDGuardError, match="non-empty"):
        optimize_blend_trigger(bn_pair.teacher, images[:0], paths=["bn1"], epochs=1)
