"""Neural Cleanse-style trigger search on tiny shortcut models (see conftest)."""

from __future__ import annotations

import pytest
import torch

from kdguard.audit import (AdditiveSearch, TriggerSearch, additive_trigger, anomaly_index,
                           flagged_classes, reverse_all, reverse_trigger)
from kdguard.errors import KDGuardError

CLASSES, TARGET = 8, 3  # the shortcut models of conftest

SEARCH = TriggerSearch(epochs=100)


@pytest.fixture(scope="module")
def backdoored_triggers(backdoored_model, clean_set):
    return reverse_all(backdoored_model, *clean_set, search=SEARCH)


def test_planted_target_has_the_smallest_mask_and_is_flagged(backdoored_triggers):
    sizes = [t.l1 for t in backdoored_triggers]
    assert [t.target for t in backdoored_triggers] == list(range(CLASSES))
    assert min(range(CLASSES), key=sizes.__getitem__) == TARGET
    assert sizes[TARGET] < 4  # the planted checkerboard is 2×2 pixels
    assert flagged_classes(sizes) == [TARGET]
    found = backdoored_triggers[TARGET]
    assert found.reached and found.success >= 0.9
    assert found.mask.shape == (1, 12, 12) and found.pattern.shape == (1, 12, 12)
    assert 0 <= float(found.mask.min()) and float(found.mask.max()) <= 1
    assert 0 <= float(found.pattern.min()) and float(found.pattern.max()) <= 1
    # the mask sits on the planted patch (rows/cols 4-5)
    assert float(found.mask[0, 4:6, 4:6].sum()) > 0.5 * found.l1


def test_clean_model_is_not_flagged(clean_model, clean_set):
    # a fixed training seed: on this 8-class toy the MAD test also flags natural classes of
    # some other clean seeds (Neural Cleanse's false positives with few, similar classes)
    sizes = [t.l1 for t in reverse_all(clean_model, *clean_set, search=SEARCH)]
    assert flagged_classes(sizes) == []
    assert max(anomaly_index(sizes)) < 2


def test_search_is_deterministic_and_restores_the_model(backdoored_model, clean_set):
    backdoored_model.train()
    flags = [p.requires_grad for p in backdoored_model.parameters()]
    short = TriggerSearch(epochs=3)
    a = reverse_trigger(backdoored_model, *clean_set, 1, search=short,
                        generator=torch.Generator().manual_seed(7))
    b = reverse_trigger(backdoored_model, *clean_set, 1, search=short,
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern) and a.l1 == b.l1
    assert backdoored_model.training and [p.requires_grad for p in backdoored_model.parameters()] == flags
    backdoored_model.eval()


def test_float_images_give_the_same_result_as_uint8(backdoored_model, clean_set):
    images, labels = clean_set
    short = TriggerSearch(epochs=2)
    a = reverse_trigger(backdoored_model, images, labels, 0, search=short)
    b = reverse_trigger(backdoored_model, images.float() / 255, labels, 0, search=short)
    assert torch.allclose(a.mask, b.mask)


def test_additive_form_reaches_the_target_with_a_small_budget(backdoored_model, clean_set):
    search = AdditiveSearch()
    found = additive_trigger(backdoored_model, *clean_set, TARGET, search=search)
    assert found.reached and found.eps < search.eps_max and found.success >= 0.8
    assert float(found.delta.abs().max()) <= found.eps + 1e-6
    other = additive_trigger(backdoored_model, *clean_set, 7, search=search)
    assert not other.reached and other.eps == search.eps_max


def test_smooth_form_is_a_bilinear_grid_and_finds_a_smooth_trigger(smooth_backdoored_model, clean_set):
    search = AdditiveSearch(grid=4)
    found = additive_trigger(smooth_backdoored_model, *clean_set, TARGET, search=search)
    assert found.reached and found.eps <= 0.125 and found.success >= 0.8
    assert found.delta.shape == (1, 12, 12) and float(found.delta.abs().max()) <= found.eps + 1e-6
    other = additive_trigger(smooth_backdoored_model, *clean_set, 7, search=search)
    assert not other.reached and other.eps == search.eps_max
    # grid 2: every channel of δ is the bilinear interpolation of its four corners
    d = additive_trigger(smooth_backdoored_model, *clean_set, TARGET, search=AdditiveSearch(grid=2)).delta[0]
    t = torch.linspace(0, 1, 12)
    top = d[0, 0] + (d[0, -1] - d[0, 0]) * t
    bottom = d[-1, 0] + (d[-1, -1] - d[-1, 0]) * t
    assert torch.allclose(d, top[None] + (bottom - top)[None] * t[:, None], atol=1e-6)
    # a grid as large as the image is the dense search itself
    dense = additive_trigger(smooth_backdoored_model, *clean_set, 7, search=AdditiveSearch())
    full = additive_trigger(smooth_backdoored_model, *clean_set, 7, search=AdditiveSearch(grid=12))
    assert torch.equal(dense.delta, full.delta) and dense.eps == full.eps


def _one_line(call, words):
    with pytest.raises(KDGuardError, match=words) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_input(backdoored_model, clean_set):
    images, labels = clean_set
    one = labels == 2
    _one_line(lambda: reverse_trigger(backdoored_model, images[one], labels[one], 2), "one class only")
    _one_line(lambda: reverse_all(backdoored_model, images[one], labels[one]), "one class only")
    # two classes, but only one image that is not of the target
    few = torch.cat([torch.nonzero(labels == 2).flatten(), torch.nonzero(labels == 5).flatten()[:1]])
    _one_line(lambda: reverse_trigger(backdoored_model, images[few], labels[few], 2),
              "only 1 clean image")
    _one_line(lambda: additive_trigger(backdoored_model, images[few], labels[few], 2),
              "only 1 clean image")
    _one_line(lambda: reverse_trigger(backdoored_model, images.float(), labels, 0),
              r"must lie in \[0, 1\]")
    _one_line(lambda: reverse_trigger(backdoored_model, images.long(), labels, 0), "cannot use")
    _one_line(lambda: reverse_trigger(backdoored_model, images[0], labels, 0), "N×C×H×W")
    _one_line(lambda: reverse_trigger(backdoored_model, images, labels[:-1], 0), "integer class labels")
    _one_line(lambda: reverse_trigger(backdoored_model, images, labels, CLASSES), "outside")
    _one_line(lambda: TriggerSearch(success_threshold=0), "outside")
    _one_line(lambda: AdditiveSearch(eps_max=2), "outside")
    assert AdditiveSearch(eps_max=0.25, bisections=5).resolution == 0.25 / 32
    _one_line(lambda: AdditiveSearch(grid=1), "grid 1 must be 0")
    _one_line(lambda: AdditiveSearch(grid=-4), "grid -4 must be 0")
