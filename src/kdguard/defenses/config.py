"""Typed configuration of a defence run (``kdguard defend``), an OmegaConf structured config.

Defaults and their sources (details in ``docs/defenses.md``):

* ``clean_fraction = 0.05``: the share of the whole training set the defender holds (NAD, Li et
  al. ICLR 2021, §4.1; BackdoorBench ``ratio: 0.05`` for FT, FP and NAD).
* ``train``: the fine-tuning schedule shared by FT, FP's fine-tuning and NAD's student phase:
  20 epochs, batch 64, SGD with Nesterov momentum 0.9, weight decay 1e-4 (NAD's ``config.py``),
  but learning rate 0.01 with a cosine decay (BackdoorBench's FT/FP/NAD configs) instead of NAD's
  0.1 → 0.01 step, because the model is already trained; NAD's schedule is
  ``train.optim.lr=0.1 train.optim.schedule=multistep train.optim.milestones=[0.1]``.
* ``fineprune``: BackdoorBench's FP rule (``acc_ratio: 0.1``, ``once_prune_ratio: 0.01``).
* ``nad``: β = 500/1000/1000 (NAD README), p = 2, the KD-Zoo/NAD attention map, a 10-epoch
  teacher fine-tune (NAD README / issue #2, BackdoorBench ``te_epochs: 10``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ..config import AttackConfig, DataConfig, OptimConfig, TeacherSpec, TrainConfig

#: ``data.name`` value meaning "the dataset named in the poisoned model's manifest".
AUTO_DATASET = "auto"


def _defense_train() -> TrainConfig:
    return TrainConfig(epochs=20, batch_size=64,
                       optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True,
                                         schedule="cosine"))


@dataclass
class FinePruneConfig:
    """Fine-pruning (Liu et al., RAID 2018) options; see :mod:`kdguard.defenses.fineprune`."""

    layer: Optional[str] = None        # module path whose output channels are pruned; null = last stage
    ca_tolerance: float = 0.10         # max relative CA drop, (CA0 − CA_k)/CA0 (BackdoorBench acc_ratio)
    step_ratio: float = 0.01           # channels added per step, fraction of C (BackdoorBench once_prune_ratio)
    max_ratio: float = 1.0             # never prune more than this fraction (and never all C channels)
    select_on: str = "val"             # data for the stopping rule: val (held-out split) | clean (subset)
    track_asr: bool = False            # also log the ASR of each pruning step (analysis only; 2× cost)


@dataclass
class NADConfig:
    """Neural Attention Distillation (Li et al., ICLR 2021) options; see :mod:`kdguard.defenses.nad`."""

    betas: list[float] = field(default_factory=list)  # per stage; empty = 500, then 1000 for each deeper stage
    p: float = 2.0                     # attention exponent (NAD config.py)
    variant: str = "nad"               # attention-map variant of kdguard.losses.attention
    teacher_epochs: int = 10           # phase 1: fine-tune the poisoned model into the NAD teacher
    student: Optional[str] = None      # null = the poisoned model itself; else a fresh registry architecture
    student_paths: Optional[list[str]] = None  # null = stage_paths(student, "stages")
    teacher_paths: Optional[list[str]] = None  # null = stage_paths(teacher, "stages")


@dataclass
class UnlearnConfig:
    """Unlearning a reconstructed trigger (Neural Cleanse §VI-C); see :mod:`kdguard.defenses.unlearn`."""

    trigger: Optional[AttackConfig] = None  # the trigger to unlearn; `kdguard defend --from-audit DIR` sets it
    share: float = 0.2                 # share of the clean images stamped, labels kept (Neural Cleanse: 20 %)


@dataclass
class DefenseJob:
    """One data-available defence of a poisoned run directory."""

    model: str = MISSING                    # the poisoned model's run directory (with manifest.json)
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    method: str = "ft"                      # a registered defence: ft | fp | nad | unlearn
    data: DataConfig = field(default_factory=lambda: DataConfig(name=AUTO_DATASET))
    attack: Optional[AttackConfig] = None   # null = the attack recorded in the model's manifest
    clean_fraction: float = 0.05            # share of the whole training set the defender holds (NAD)
    train: TrainConfig = field(default_factory=_defense_train)
    fineprune: FinePruneConfig = field(default_factory=FinePruneConfig)
    nad: NADConfig = field(default_factory=NADConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    seed: int = 0
    out: str = "runs/defense"
