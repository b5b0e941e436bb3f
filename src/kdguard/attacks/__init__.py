"""Backdoor attacks: triggers (``attacks.triggers``), training-set poisoning
(``attacks.poison``) and an attack from a job's config or a manifest (``attacks.records``)."""

from __future__ import annotations

from .poison import (ATTACK_PRESETS, AttackPreset, AttackSpec, PoisonedDataset, apply_poison,
                     backdoor_targets, backdoor_test_set, build_attack, non_target_mask,
                     poison_dataset, select_poison_indices, trigger_images)
from .records import attack_from_manifest, attack_record, make_attack
from .triggers import TRIGGERS, Trigger, build_trigger

__all__ = [
    "ATTACK_PRESETS", "AttackPreset", "AttackSpec", "PoisonedDataset", "TRIGGERS", "Trigger",
    "apply_poison", "attack_from_manifest", "attack_record", "backdoor_targets", "backdoor_test_set", "build_attack", "build_trigger",
    "make_attack", "non_target_mask", "poison_dataset", "select_poison_indices", "trigger_images",
]
