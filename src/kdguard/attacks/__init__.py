"""Backdoor attacks: triggers (``attacks.triggers``) and training-set poisoning
(``attacks.poison``)."""

from __future__ import annotations

from .poison import (ATTACK_PRESETS, AttackPreset, AttackSpec, PoisonedDataset, apply_poison,
                     backdoor_targets, backdoor_test_set, build_attack, non_target_mask,
                     poison_dataset, select_poison_indices, trigger_images)
from .triggers import TRIGGERS, Trigger, build_trigger

__all__ = [
    "ATTACK_PRESETS", "AttackPreset", "AttackSpec", "PoisonedDataset", "TRIGGERS", "Trigger",
    "apply_poison", "backdoor_targets", "backdoor_test_set", "build_attack", "build_trigger",
    "non_target_mask", "poison_dataset", "select_poison_indices", "trigger_images",
]
