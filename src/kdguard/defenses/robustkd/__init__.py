"""RobustKD (Chen et al., arXiv 2406.03409; Applied Soft Computing 2024, 111907) in kdguard.

Compress a possibly backdoored teacher into a small student: replace suspicious teacher features
by clean-mean features (detoxification, :mod:`.detox`, optimised with :mod:`.objective` by
:mod:`.optimize`), then distil the detoxified features with OFD (:mod:`.distill`). The job that
does both is :func:`kdguard.jobs.run_robustkd` (settings in :mod:`.config`); the optimised
blended trigger attack of the reference code is :mod:`.trigger_opt` (trigger name
``"robustkd_blend"``). The code that
optimises the detox masks was never released: see ``docs/robustkd.md`` for what is known and
what kdguard decided.
"""

from __future__ import annotations

from .detox import DETOX_FILE, DetoxHooks, FeatureDetox, StageDetox
from .distill import RobustKDDistiller, align_stages, salt_and_pepper
from .objective import DetoxObjective
from .optimize import DetoxResult, detoxify
from .presets import PAIRS, PairPreset, get_pair
from .config import DetoxConfig, RobustKDDistillConfig, RobustKDJob, TriggerJob
from .stats import StageStats, clean_feature_stats, normalized_variance
from .trigger_opt import RobustKDBlend, TriggerResult, optimize_blend_trigger

__all__ = [
    "DETOX_FILE", "PAIRS", "DetoxConfig", "DetoxHooks", "DetoxObjective", "DetoxResult", "FeatureDetox",
    "PairPreset", "RobustKDBlend", "RobustKDDistillConfig", "RobustKDDistiller", "RobustKDJob",
    "StageDetox", "StageStats", "TriggerJob", "TriggerResult", "align_stages", "clean_feature_stats",
    "detoxify", "get_pair", "normalized_variance", "optimize_blend_trigger", "salt_and_pepper",
]
