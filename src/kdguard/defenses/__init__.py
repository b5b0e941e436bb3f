"""Data-available backdoor defences: fine-tuning (FT), fine-pruning (FP), NAD and unlearning a
reconstructed trigger (Neural Cleanse).

Each defence is registered in :data:`DEFENSES` with a :class:`Defense` description (stage
relative to distillation, default clean-data share, labels, teacher access) and runs as
``kdguard.jobs.run_defense(DefenseJob(model=RUN_DIR, method="nad", ...)) -> RunResult``, writing a run
directory like every other job (``metrics.json``, ``manifest.json`` with role ``"defense"``,
``model.safetensors``, ``report.md``). CLI: ``kdguard defend --model RUN_DIR method=nad``.
"""

from __future__ import annotations

from .base import DEFENSES, STAGES, Defense, register_defense
from .config import AUTO_DATASET, DefenseJob, FinePruneConfig, NADConfig, UnlearnConfig
from .runner import DefenseContext, clean_subset, finish_defense, prepare_defense
from . import finetune, fineprune, nad, unlearn  # noqa: E402,F401  (register the built-in defences)
from .fineprune import ChannelConsumer, ChannelPruner, channel_activations, find_consumer, select_prune_count
from .nad import NADDistiller, default_betas, resolve_betas

__all__ = ["AUTO_DATASET", "DEFENSES", "STAGES", "ChannelConsumer", "ChannelPruner", "Defense", "DefenseContext",
           "DefenseJob", "FinePruneConfig", "NADConfig", "NADDistiller", "UnlearnConfig", "channel_activations", "clean_subset",
           "default_betas", "find_consumer", "finish_defense", "prepare_defense", "register_defense",
           "resolve_betas", "select_prune_count"]
