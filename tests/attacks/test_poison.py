"""Tests for kdguard.attacks.poison: counts, pools, labels, RNG independence, images, save/load,
backdoor-test labels and presets. Tiny synthetic datasets only."""

from __future__ import annotations

import json

import pytest
import torch

from kdguard.attacks import (ATTACK_PRESETS, AttackSpec, PoisonedDataset, apply_poison,
                             backdoor_targets, backdoor_test_set, build_attack, build_trigger,
                             non_target_mask, poison_dataset, select_poison_indices)
from kdguard.data.dataset import ImageDataset
from kdguard.errors import KDGuardError

SHAPE = (3, 8, 8)
K = 10
N = 200


@pytest.fixture()
def ds() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(N) % K)[torch.randperm(N, generator=g)]  # 20 images per class
    images = torch.randint(0, 256, (N, *SHAPE), dtype=torch.uint8, generator=g)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(K)), name="toy")


def _spec(**kw) -> AttackSpec:
    trigger = kw.pop("trigger", None) or build_trigger("badnets_grid", SHAPE)
    return AttackSpec(trigger=trigger, **kw)


def test_dirty_label_all_to_one_counts_pool_labels_and_images(ds):
    images_before, labels_before = ds.images.clone(), ds.labels.clone()
    spec = _spec(target=2, poison_rate=0.15)
    p = poison_dataset(ds, spec, seed=0)
    idx = p.poison_indices
    assert idx.dtype == torch.int64 and idx.numel() == round(0.15 * N) == 30
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == 30
    assert bool((ds.labels[idx] != 2).all()), "drew a target-class image"
    assert torch.equal(p.poison_flags.nonzero().squeeze(1), idx)
    assert torch.equal(p.original_labels, ds.labels)
    assert bool((p.dataset.labels[idx] == 2).all())
    clean = ~p.poison_flags
    assert torch.equal(p.dataset.labels[clean], ds.labels[clean])
    assert torch.equal(p.dataset.images[idx], spec.trigger(ds.images[idx]))
    assert torch.equal(p.dataset.images[clean], ds.images[clean])
    assert not torch.equal(p.dataset.images[idx], ds.images[idx])
    assert torch.equal(ds.images, images_before) and torch.equal(ds.labels, labels_before)
    assert p.as_dataset() is p.dataset and p.num_poisoned == 30


def test_clean_label_poisons_only_target_class_and_keeps_labels(ds):
    spec = _spec(target=4, poisoning="clean_label", poison_rate=0.5,
                 trigger=build_trigger("sig", SHAPE))
    p = poison_dataset(ds, spec, seed=1)
    assert p.num_poisoned == round(0.5 * 20) == 10
    assert bool((ds.labels[p.poison_indices] == 4).all())
    assert torch.equal(p.dataset.labels, ds.labels)
    idx = p.poison_indices
    assert torch.equal(p.dataset.images[idx], spec.trigger(ds.images[idx]))


def test_all_to_all_shifts_labels_by_one(ds):
    spec = _spec(label_mode="all_to_all", poison_rate=0.5)
    p = poison_dataset(ds, spec, seed=0)
    idx = p.poison_indices
    assert idx.numel() == 100
    assert torch.equal(p.dataset.labels[idx], (ds.labels[idx] + 1) % K)
    assert bool((ds.labels[idx] == 0).any()), "all-to-all should draw from every class"


def test_indices_reproducible_and_independent_of_global_rng(ds):
    spec = _spec(poison_rate=0.1)
    torch.manual_seed(1)
    a = select_poison_indices(ds.labels, spec, seed=5)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = select_poison_indices(ds.labels, spec, seed=5)
    assert torch.equal(state, torch.get_rng_state()), "poisoning consumed the global RNG"
    assert torch.equal(a, b)
    assert not torch.equal(a, select_poison_indices(ds.labels, spec, seed=6))
    assert torch.equal(poison_dataset(ds, spec, seed=5).poison_indices, a)


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_rate_outside_unit_interval_raises(rate):
    with pytest.raises(KDGuardError, match="poison rate"):
        _spec(poison_rate=rate)


def test_rate_that_exceeds_the_pool_or_rounds_to_zero_raises(ds):
    with pytest.raises(KDGuardError, match="only 180 non-target-class images"):
        poison_dataset(ds, _spec(poison_rate=1.0), seed=0)
    with pytest.raises(KDGuardError, match="rounds to 0"):
        poison_dataset(ds, _spec(poison_rate=0.001), seed=0)


def test_bad_spec_and_dataset_mismatches_raise(ds):
    with pytest.raises(KDGuardError, match="all-to-all"):
        _spec(poisoning="clean_label", label_mode="all_to_all")
    with pytest.raises(KDGuardError, match="label_mode"):
        _spec(label_mode="one_to_one")
    with pytest.raises(KDGuardError, match="target 10 is not a class"):
        poison_dataset(ds, _spec(target=10), seed=0)
    with pytest.raises(KDGuardError, match="image_shape=dataset.shape"):
        poison_dataset(ds, _spec(trigger=build_trigger("badnets_grid", (3, 32, 32))), seed=0)
    with pytest.raises(KDGuardError, match="not a Trigger"):
        AttackSpec(trigger="badnets")
    with pytest.raises(KDGuardError, match="range"):
        apply_poison(ds, _spec(), torch.tensor([0, N]))


def test_save_and_load_indices_round_trip(ds, tmp_path):
    spec = build_attack("blend", SHAPE, target=3, seed=2)
    p = poison_dataset(ds, spec, seed=11)
    path = p.save_indices(tmp_path / "run" / "poison_indices.json")
    record = json.loads(path.read_text())
    assert record["num_samples"] == N and record["seed"] == 11
    loaded = PoisonedDataset.read_indices(path)["poison_indices"]
    assert loaded.dtype == torch.int64 and torch.equal(loaded, p.poison_indices)
    replay = PoisonedDataset.load(path, ds)  # attack rebuilt from the file
    assert torch.equal(replay.dataset.images, p.dataset.images)
    assert torch.equal(replay.dataset.labels, p.dataset.labels)
    assert torch.equal(replay.poison_flags, p.poison_flags)
    assert replay.spec.params() == spec.params() and replay.seed == 11

    with pytest.raises(KDGuardError, match="saved for 200 images"):
        PoisonedDataset.load(path, ds.subset(torch.arange(50)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KDGuardError, match="not a kdguard poison index file"):
        PoisonedDataset.read_indices(bad)
    with pytest.raises(KDGuardError, match="does not exist"):
        PoisonedDataset.read_indices(tmp_path / "missing.json")


def test_backdoor_targets_and_non_target_mask():
    labels = torch.tensor([0, 1, 2, 9])
    one = _spec(target=2)
    assert backdoor_targets(labels, one, K).tolist() == [2, 2, 2, 2]
    assert non_target_mask(labels, one).tolist() == [True, True, False, True]
    every = _spec(label_mode="all_to_all")
    assert backdoor_targets(labels, every, K).tolist() == [1, 2, 3, 0]
    assert non_target_mask(labels, every).tolist() == [True] * 4
    clean = _spec(target=9, poisoning="clean_label")
    assert backdoor_targets(labels, clean, K).tolist() == [9] * 4
    assert non_target_mask(labels, clean).tolist() == [True, True, True, False]


def test_backdoor_test_set_drops_target_class_and_keeps_original_labels(ds):
    spec = _spec(target=1)
    bd = backdoor_test_set(ds, spec)
    keep = ds.labels != 1
    assert len(bd) == int(keep.sum()) == 180
    assert torch.equal(bd.labels, ds.labels[keep])
    assert torch.equal(bd.images, spec.trigger(ds.images[keep]))
    assert len(backdoor_test_set(ds, spec, include_target=True)) == N


def test_presets_and_build_attack():
    for name, preset in ATTACK_PRESETS.items():
        spec = build_attack(name, (3, 32, 32))
        assert spec.name == name and spec.trigger.name == preset.trigger
        json.dumps(spec.params())
    sig = build_attack("sig", SHAPE, target=5)
    assert sig.poisoning == "clean_label" and sig.poison_rate == 1.0 and sig.target == 5
    badnets = build_attack("badnets", SHAPE)
    assert badnets.trigger.name == "badnets_grid" and badnets.poison_rate == 0.1
    assert badnets.poisoning == "dirty_label"
    raw = build_attack("badnets_square", SHAPE, poison_rate=0.05, size=2)
    assert raw.poison_rate == 0.05 and raw.trigger.size == (2, 2)
    assert build_attack("sig_abd", SHAPE).trigger.mode == "blend"
    rebuilt = AttackSpec.from_params(json.loads(json.dumps(raw.params())))
    assert rebuilt.params() == raw.params()
    with pytest.raises(KDGuardError, match="unknown attack 'badnet'"):
        build_attack("badnet", SHAPE)
    with pytest.raises(KDGuardError, match="valid parameters"):
        build_attack("wanet", SHAPE, strenght=0.2)
    with pytest.raises(KDGuardError, match="all-to-all"):
        build_attack("sig", SHAPE, label_mode="all_to_all")
