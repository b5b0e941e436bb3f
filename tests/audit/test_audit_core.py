"""The whole audit on the tiny shortcut models of conftest: the planted backdoor is found with its
target, the clean model is not called backdoored, and the result is complete and deterministic."""

from __future__ import annotations

import pytest
import torch

from kdguard.audit.core import SMOOTH_GRID, AuditSettings, audit_model, cap_images
from kdguard.audit.reachability import AdditiveSearch, TriggerSearch
from kdguard.errors import KDGuardError
from kdguard.audit.shuffle_check import ShuffleCheck

TARGET = 3
SETTINGS = AuditSettings(search=TriggerSearch(epochs=60), shuffle=ShuffleCheck(rounds=1), max_images=0,
                         smooth=AdditiveSearch(grid=SMOOTH_GRID))


@pytest.fixture(scope="module")
def backdoored_audit(backdoored_model, clean_set):
    with pytest.warns(UserWarning, match="shuffling all 1"):  # the toy has one linear layer to shuffle
        return audit_model(backdoored_model, *clean_set, settings=SETTINGS)


def test_planted_backdoor_is_found_with_its_target(backdoored_audit):
    r = backdoored_audit
    assert r.verdict.verdict == "backdoored" and r.verdict.targets == [TARGET]
    assert "mask" in r.verdict.signals[TARGET]
    found = r.classes[TARGET]
    assert found.trigger.l1 < 4 and found.trigger.success >= 0.9  # the planted patch is 2×2
    assert found.additive.eps < min(f.additive.eps for f in r.classes if f.target != TARGET)
    assert r.clean_accuracy > 0.95 and r.n_images == 256
    d = r.to_dict()
    assert d["suspected_targets"] == [TARGET] and len(d["classes"]) == 8
    assert set(d["seconds"]) == {"mask", "additive", "smooth", "shuffle", "total"}
    assert {"smooth_eps", "smooth_success", "smooth_reached"} <= set(d["classes"][TARGET])
    assert set(d["classes"][TARGET]["index"]) == {"mask", "additive", "smooth", "shuffle"}
    assert found.smooth.eps < min(f.smooth.eps for f in r.classes if f.target != TARGET)


def test_clean_model_is_not_called_backdoored(clean_model, clean_set):
    with pytest.warns(UserWarning):
        r = audit_model(clean_model, *clean_set, settings=SETTINGS)
    assert r.verdict.verdict != "backdoored"
    assert max(f.index["mask"] for f in r.classes) < 2


def test_checks_can_be_left_out(backdoored_model, clean_set):
    r = audit_model(backdoored_model, *clean_set, settings=AuditSettings(
        search=TriggerSearch(epochs=60), additive=None, smooth=None, shuffle=None, votes=1, max_images=0))
    assert r.verdict.verdict == "backdoored" and r.verdict.targets[0] == TARGET
    assert set(r.classes[0].index) == {"mask"} and r.classes[0].additive is None and r.clean_shuffle is None
    assert r.classes[0].smooth is None and "smooth_eps" not in r.to_dict()["classes"][0]


def test_smooth_trigger_is_found_by_the_smooth_search(smooth_backdoored_model, clean_set):
    r = audit_model(smooth_backdoored_model, *clean_set, settings=AuditSettings(
        search=TriggerSearch(epochs=5), additive=None, shuffle=None, votes=1, max_images=0,
        smooth=AdditiveSearch(grid=4)))
    assert "smooth" in r.verdict.signals.get(TARGET, [])
    assert r.classes[TARGET].index["smooth"] > 2


def test_settings_refuse_a_smooth_search_without_a_grid_and_count_its_vote():
    with pytest.raises(KDGuardError, match="control grid"):
        AuditSettings(smooth=AdditiveSearch())
    assert AuditSettings().smooth is None  # opt-in
    assert AuditSettings(smooth=AdditiveSearch(grid=SMOOTH_GRID), votes=4).votes == 4
    with pytest.raises(KDGuardError, match=r"outside \[1, 3\]"):
        AuditSettings(votes=4)


def test_cap_keeps_every_class_in_proportion():
    labels = torch.arange(100) % 4
    images = torch.rand(100, 1, 4, 4)
    x, y = cap_images(images, labels, 20, seed=0)
    assert len(x) == 20 and torch.bincount(y).tolist() == [5, 5, 5, 5]
    assert cap_images(images, labels, 0, seed=0)[0] is images
