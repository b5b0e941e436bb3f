"""Settings of the RobustKD jobs: :class:`RobustKDJob` (detoxify, then distil) and
:class:`TriggerJob` (learn the ``robustkd_blend`` trigger); the jobs are in :mod:`kdguard.jobs.robustkd`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import MISSING
from torch import nn

from ...config import AttackConfig, DataConfig, TeacherSpec, TrainConfig
from ...data import ImageDataset
from ...models.stages import stage_paths
from .objective import DetoxObjective
from .optimize import DetoxResult, detoxify
from .presets import get_pair

DEFAULT_DATASET = DataConfig().name


@dataclass
class DetoxConfig:
    """How the teacher is detoxified (see ``objective.py`` for the equations)."""

    enabled: bool = True                   # false: no detoxification (plain OFD / KD baseline)
    only: bool = False                     # true: stop after it; the detoxified teacher's CA/ASR is the result
    load: Optional[str] = None             # reuse a saved detox.safetensors (or its run directory)
    paths: Optional[list[str]] = None      # null = the teacher's pre_relu stage preset
    granularity: str = "element"           # element (C×H×W, reference tensors) | channel (C×1×1)
    combine: str = "replace"               # replace: (1−M)F + MP (reference WRN) | additive: F + MP
    init_mask: float = 0.05
    activation: str = "relu"               # a(·) of the clean variance statistics
    form: str = "dormant"                  # dormant (kdguard default) | variance (literal reading)
    ce_weight: float = 1.0                 # w_ce: CE of the detoxified teacher to clean labels
    kd_weight: float = 1.0                 # w_kd: τ²·KL to the original teacher
    temperature: float = 4.0
    sparsity_weight: float = 1.0           # λ_s (dormant)
    variance_weight: float = 0.25          # λ_v (dormant)
    feature_variance_weight: float = 1.0   # λ_f (variance)
    mask_size_weight: float = 0.1          # λ_m (variance)
    adversarial_weight: float = 0.0        # λ_a: universal perturbation the masks must defuse (0 = off)
    epsilon: float = 0.2                   # ε: L∞ radius of δ, pixel units
    adversarial_step: float = 0.02         # α: δ's signed ascent step per mini-batch
    adversarial_against: str = "detoxified"  # detoxified: min-max | teacher: δ* on the original teacher, fixed
    perturbation_epochs: int = 2           # passes that search δ* (adversarial_against=teacher)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1                        # Adam, mask logits
    replacement_lr: Optional[float] = None  # Adam, P (null = lr)
    learn_replacement: bool = True
    binarize: Optional[float] = None       # threshold to make M exactly 0/1 after optimising
    augment: bool = False

    def objective(self) -> DetoxObjective:
        return DetoxObjective(form=self.form, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                              temperature=self.temperature, sparsity_weight=self.sparsity_weight,
                              variance_weight=self.variance_weight,
                              feature_variance_weight=self.feature_variance_weight,
                              mask_size_weight=self.mask_size_weight,
                              adversarial_weight=self.adversarial_weight, epsilon=self.epsilon,
                              adversarial_step=self.adversarial_step,
                              adversarial_against=self.adversarial_against,
                              perturbation_epochs=self.perturbation_epochs)

    def detoxify(self, teacher: nn.Module, clean: ImageDataset, *, augment=None,
                 device: torch.device | str = "cpu", bf16: bool = False, seed: int = 0,
                 progress: bool = False) -> DetoxResult:
        """Run :func:`~.optimize.detoxify` on ``clean`` with these settings.

        ``paths`` unset means the teacher's ``pre_relu`` stage preset; ``augment`` is the batched
        augmentation to use when ``self.augment`` is on (ignored otherwise).

        Raises:
            KDGuardError: as :func:`~.optimize.detoxify`.
        """
        paths = list(self.paths) if self.paths else list(stage_paths(teacher, "pre_relu"))
        return detoxify(teacher, clean.images, clean.labels, paths=paths, objective=self.objective(),
                        granularity=self.granularity, combine=self.combine, init_mask=self.init_mask,
                        activation=self.activation, epochs=self.epochs, batch_size=self.batch_size,
                        lr=self.lr, replacement_lr=self.replacement_lr,
                        learn_replacement=self.learn_replacement, binarize=self.binarize,
                        augment=augment if self.augment else None, device=device, bf16=bf16, seed=seed,
                        progress=progress)


@dataclass
class RobustKDDistillConfig:
    """How the student learns from the (detoxified) teacher."""

    method: str = "ofd"                    # ofd (RobustKD) | kd (Hinton KD from the same teacher)
    ce_weight: float = 1.0                 # reference: CE + OFD
    ofd_weight: float = 1.0                # the 1/(1000·B) normalisation is inside the OFD term
    kd_weight: float = 0.9                 # method kd (with ce_weight 0.1 = Hinton's α 0.9)
    temperature: float = 4.0
    margin: str = "auto"                   # auto | bn | none
    normalization: str = "reference"
    stage_weights: str = "reference"
    noise: float = 0.0                     # salt-and-pepper density for the student (reference helper: 0.1)
    student_paths: Optional[list[str]] = None
    teacher_paths: Optional[list[str]] = None


@dataclass
class RobustKDJob:
    teacher: str = MISSING                 # teacher run directory or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    pair: Optional[str] = None             # a presets.PAIRS name; gives the student when unset
    student: Optional[str] = None          # student architecture (default: the pair's, else resnet8)
    data: DataConfig = field(default_factory=DataConfig)  # name defaults to the teacher's dataset
    attack: Optional[AttackConfig] = None  # null = the attack in the teacher's manifest
    clean_fraction: float = 0.2            # clean labelled share of the training data
    detox: DetoxConfig = field(default_factory=DetoxConfig)
    distill: RobustKDDistillConfig = field(default_factory=RobustKDDistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out: str = "runs/robustkd"


def student_name(job: RobustKDJob) -> str:
    """The student architecture: ``job.student``, else the pair's, else ``resnet8``."""
    if job.student:
        return job.student
    if job.pair:
        return get_pair(job.pair).student
    return "resnet8"


@dataclass
class TriggerJob:
    """Learn the ``robustkd_blend`` trigger on a clean teacher (``trigger_opt.py``)."""

    teacher: str = MISSING                 # a CLEAN teacher run directory or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    data: DataConfig = field(default_factory=DataConfig)  # name defaults to the teacher's dataset
    fraction: float = 0.1                  # share of the training split used (reference: all of it)
    paths: Optional[list[str]] = None      # null = the teacher's stages preset
    top_fraction: float = 0.1              # reference num_n = 10 %
    max_mask: float = 0.2                  # reference clamp(mask, 0, 0.2)
    epochs: int = 200                      # reference
    batch_size: int = 64                   # reference
    lr: float = 0.005                      # reference (Adam)
    normalize_stages: bool = True
    device: str = "auto"
    progress: bool = True
    seed: int = 0
    out: str = "runs/robustkd_trigger"
