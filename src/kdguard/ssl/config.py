"""Typed job configurations of the SSL track (OmegaConf structured configs, YAML + ``key=value``).

Defaults are the paper-scale values of the reference code, named in comments:

* SimCLR pre-training: BadEncoder ``pretraining_encoder.py`` (Jia et al., S&P 2022): SimCLR
  ResNet-18, Adam lr 1e-3, weight decay 1e-6, constant rate, batch 256, 1000 epochs, τ = 0.5.
* BadEncoder: ``badencoder.py``: SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 256,
  200 epochs, λ₁ = λ₂ = 1, the 10×10 white patch at (21, 21) of ``trigger_pt_white_21_10``.
* Downstream probe: ``training_downstream_classifier.py``: L2-normalised features, MLP 512–256
  with dropout 0.5, Adam lr 1e-4, batch 64, 500 epochs.
* Defence: paper 1's ``distillation.py`` (Han et al. 2024): Adam lr 1e-3, weight decay 1e-6,
  batch 128, 500 epochs, 5 % clean data, τ = 0.5. Its teacher fine-tuning and warm-up schedules
  are not published: the values here are kdguard's choices (documented in ``docs/ssl.md``).

The CPU-scale preset (ResNet-20, tens of epochs on CIFAR-10 subsets) is the ``ssl`` suite's
(``kdguard/configs/suites/ssl.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from ..config import OptimConfig, TeacherSpec, TrainConfig
from ..errors import KDGuardError
from ..augment import SimCLRAugment


def adam_schedule(epochs: int, batch_size: int) -> TrainConfig:
    """Adam, lr 1e-3, weight decay 1e-6, constant rate (BadEncoder SimCLR / paper 1 distillation)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size,
                       optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-6, schedule="constant"))


def _badencoder_schedule() -> TrainConfig:
    return TrainConfig(epochs=200, batch_size=256,
                       optim=OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4,
                                         schedule="constant"))


@dataclass
class EncoderConfig:
    arch: str = "resnet18"                 # SimCLR ResNet-18 (BadEncoder, paper 1); CPU scale: resnet20
    proj_hidden: int = 512                 # projection head 512 → 128 (BadEncoder simclr_model.py)
    proj_dim: int = 128
    options: dict[str, Any] = field(default_factory=dict)  # architecture options of build_model


@dataclass
class SSLDataConfig:
    name: str = "cifar10"                  # pre-training / shadow / clean-subset dataset
    root: Optional[str] = None             # data root; else $KDGUARD_DATA_ROOT
    limit: Optional[int] = None            # seeded random subset of the training split; null = all


@dataclass
class AugmentConfig:
    """SimCLR view generation (BadEncoder's ``train_transform``); see :class:`SimCLRAugment`."""

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop default
    hflip: bool = SimCLRAugment.hflip
    brightness: float = SimCLRAugment.brightness
    contrast: float = SimCLRAugment.contrast
    saturation: float = SimCLRAugment.saturation
    hue: float = SimCLRAugment.hue
    jitter_p: float = SimCLRAugment.jitter_p
    gray_p: float = SimCLRAugment.gray_p

    def check_settings(self, key: str = "augment") -> None:
        """Check the ranges under the dotted ``key`` before a run starts (the augmentation itself
        checks them only when first applied, mid-training).

        Raises:
            KDGuardError: naming the first bad setting.
        """
        scale = list(self.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise KDGuardError(f"{key}.crop_scale={scale} is not [low, high] with 0 < low <= high <= 1",
                               f"set e.g. {key}.crop_scale=[0.08,1.0]")
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0:
                raise KDGuardError(f"{key}.{name}={getattr(self, name)!r} is negative", f"set e.g. {key}.{name}=0.4")
        for name, high, example in (("hue", 0.5, "0.1"), ("jitter_p", 1.0, "0.8"), ("gray_p", 1.0, "0.2")):
            if not 0 <= getattr(self, name) <= high:
                raise KDGuardError(f"{key}.{name}={getattr(self, name)!r} is outside [0, {high:g}]",
                                   f"set e.g. {key}.{name}={example}")

    def build(self, crop: bool = True) -> SimCLRAugment:
        return SimCLRAugment(crop=crop, scale=(float(self.crop_scale[0]), float(self.crop_scale[1])),
                             hflip=self.hflip, brightness=self.brightness, contrast=self.contrast,
                             saturation=self.saturation, hue=self.hue, jitter_p=self.jitter_p,
                             gray_p=self.gray_p)


@dataclass
class PretrainJob:
    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=lambda: adam_schedule(1000, 256))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    temperature: float = 0.5               # NT-Xent τ (BadEncoder / paper 1 --knn-t)
    knn_k: int = 200                       # kNN monitor after training (BadEncoder: k = 200, t = 0.5); 0 = skip
    seed: int = 0
    out: str = "runs/ssl/pretrain"

    def check_settings(self, key: str = "") -> None:
        """Raise :class:`KDGuardError` for a temperature <= 0 or a negative ``knn_k``."""
        if not self.temperature > 0:
            raise KDGuardError(f"temperature={self.temperature!r} must be > 0", "set e.g. temperature=0.5")
        if self.knn_k < 0:
            raise KDGuardError(f"knn_k={self.knn_k} is negative", "set knn_k=200, or knn_k=0 to skip the monitor")


@dataclass
class TargetConfig:
    """One attacked downstream task: its dataset, target class, trigger and reference inputs."""

    dataset: str = "cifar10"               # downstream dataset; references come from its train split
    root: Optional[str] = None             # null = the shadow data's root
    target: int = 9                        # CIFAR-10 "truck" (BadEncoder's truck reference)
    trigger: str = "badnets_square"        # any registered trigger (`kdguard list`)
    trigger_params: dict[str, Any] = field(
        default_factory=lambda: {"size": 10, "position": [21, 21], "color": 255})  # trigger_pt_white_21_10
    trigger_seed: int = 0
    references: int = 1                    # reference inputs of the target class (BadEncoder pairs one per trigger)


@dataclass
class BadEncoderJob:
    encoder: str = MISSING                 # clean SSL checkpoint (run directory of ssl-pretrain)
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare encoder weights file
    shadow: SSLDataConfig = field(default_factory=SSLDataConfig)  # BadEncoder CIFAR-10: the whole train split
    targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig()])
    lambda1: float = 1.0                   # weight of L1 (reference embeddings kept)
    lambda2: float = 1.0                   # weight of L2 (clean embeddings kept)
    augment_references: bool = True       # L1 on augmented references (BadEncoder code) vs plain (paper)
    freeze_bn: bool = True                 # BatchNorm in eval mode, affine frozen (BadEncoder code)
    train: TrainConfig = field(default_factory=_badencoder_schedule)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # only for the reference augmentation
    seed: int = 0
    out: str = "runs/ssl/badencoder"


@dataclass
class ProbeConfig:
    """Downstream classifier on frozen, L2-normalised features (BadEncoder's ``NeuralNet``)."""

    head: str = "mlp"                      # mlp | linear
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = 0.5
    epochs: int = 500
    batch_size: int = 64
    lr: float = 1e-4                       # Adam
    normalize: bool = True                 # F.normalize features (BadEncoder predict_feature)
    train_limit: Optional[int] = None      # seeded random subset of the downstream train split
    test_limit: Optional[int] = None       # seeded random subset of the test split
    device: str = "auto"
    feature_batch_size: int = 512


@dataclass
class ProbeJob:
    encoder: str = MISSING                 # SSL checkpoint to evaluate
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare encoder weights file
    datasets: list[str] = field(default_factory=lambda: ["cifar10", "gtsrb"])
    root: Optional[str] = None
    targets: list[TargetConfig] = field(default_factory=list)  # empty = the attack in the encoder's manifest
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    out: str = "runs/ssl/probe"


@dataclass
class DefenseConfig:
    """The distillation defence of paper 1 and its components."""

    clean_fraction: float = 0.05           # share of the pre-training train split (paper 1 --ratio)
    temperature: float = 0.5               # student's NT-Xent τ
    stage_weights: Optional[list[float]] = None  # per stage; null = the loss's default (see LOSSES)
    output_weight: float = 0.0             # w5: −cos(f_T, f_S) on the output features (paper 1 SP mode: 1)
    loss_options: dict[str, Any] = field(default_factory=dict)  # e.g. variant=zagoruyko (at), temperature (kd)
    train: TrainConfig = field(default_factory=lambda: adam_schedule(500, 128))  # paper 1 distillation.py
    # teacher fine-tuning (also NAD's and fine-pruning's) and student warm-up: not published by
    # paper 1, kdguard's choice
    finetune: TrainConfig = field(default_factory=lambda: adam_schedule(100, 128))
    warmup: TrainConfig = field(default_factory=lambda: adam_schedule(100, 128))
    nad_betas: list[float] = field(default_factory=list)  # NAD AT weights per stage; empty = 500, then 1000
    prune_ratio: float = 0.2               # fine-pruning: share of last-stage channels switched off
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check_settings(self, key: str = "defense") -> None:
        """Check the ranges under the dotted ``key`` before a run starts (the teachers and the
        warm-up student are trained before the distillation would reject them).

        Raises:
            KDGuardError: naming the first bad setting.
        """
        checks = (
            ("clean_fraction", 0 < self.clean_fraction <= 1, "is outside (0, 1]", "0.05"),
            ("temperature", self.temperature > 0, "must be > 0", "0.5"),
            ("output_weight", self.output_weight >= 0, "must be >= 0", "0"),
            ("prune_ratio", 0 <= self.prune_ratio < 1, "is outside [0, 1)", "0.2"),
            ("stage_weights", all(w >= 0 for w in self.stage_weights or ()), "must be weights >= 0", "null"),
            ("nad_betas", all(b >= 0 for b in self.nad_betas), "must be weights >= 0", "[]"),
        )
        for name, ok, rule, example in checks:
            if not ok:
                raise KDGuardError(f"{key}.{name}={getattr(self, name)!r} {rule}", f"set e.g. {key}.{name}={example}")

    def check_loss_options(self, losses: list[str], key: str = "defense") -> None:
        """Raise :class:`KDGuardError` unless every loss of ``losses`` is known and accepts
        ``loss_options`` (names, variant, ranges)."""
        from .stage_losses import LOSSES, check_options

        for loss in losses:
            spec = LOSSES.get(loss)
            try:
                check_options(spec.name, dict(self.loss_options))
            except KDGuardError as e:
                raise KDGuardError(f"{key}.loss_options for loss {spec.name!r}: {e.problem}",
                                   f"{e.fix} ({key}.loss_options.NAME=VALUE; options of {spec.name}: "
                                   f"{', '.join(spec.options) or 'none'})") from None


@dataclass
class DefendJob:
    encoder: str = MISSING                 # the poisoned SSL checkpoint
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare encoder weights file
    data: SSLDataConfig = field(default_factory=SSLDataConfig)  # where the clean subset comes from
    teacher: str = "finetuned"             # poisoned | finetuned | nad | fine_pruning (paper 1's best: fine-tuned)
    student: str = "warmup"                # random | warmup | poisoned (paper 1's best: warm-up)
    loss: str = "at"                       # at | afd | fitnet | cc | kd | sp (paper 1's best: attention-based)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    datasets: list[str] = field(default_factory=lambda: ["cifar10", "gtsrb"])  # downstream evaluation
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    out: str = "runs/ssl/defend"

    def check_settings(self, key: str = "") -> None:
        """Raise :class:`KDGuardError` for a loss that does not take ``defense.loss_options``."""
        self.defense.check_loss_options([self.loss])


@dataclass
class GridJob:
    encoder: str = MISSING                 # the poisoned SSL checkpoint
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare encoder weights file
    clean_encoder: Optional[str] = None    # optional clean checkpoint for a reference row
    data: SSLDataConfig = field(default_factory=SSLDataConfig)
    teachers: list[str] = field(default_factory=lambda: ["poisoned", "finetuned", "nad", "fine_pruning"])
    students: list[str] = field(default_factory=lambda: ["random", "warmup", "poisoned"])
    losses: list[str] = field(default_factory=lambda: ["at", "afd", "fitnet", "cc", "kd", "sp"])
    cells: str = "factorial"               # factorial | one_at_a_time (first of each list = base cell)
    probe_teachers: bool = True            # also evaluate each prepared teacher as an encoder
    probe_students: bool = True            # ... and the warm-up student before distillation
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    datasets: list[str] = field(default_factory=lambda: ["cifar10", "gtsrb"])
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    asr_goal: float = 0.15                 # "meets goal": mean ASR below this ...
    ca_cost_goal: float = 0.04             # ... at a mean CA cost (vs the poisoned encoder) of at most this
    seed: int = 0
    out: str = "runs/ssl/grid"

    def check_settings(self, key: str = "") -> None:
        """Raise :class:`KDGuardError` for goals outside [0, 1] or a loss that does not take
        ``defense.loss_options`` (they apply to every loss of the grid)."""
        for name in ("asr_goal", "ca_cost_goal"):
            if not 0 <= getattr(self, name) <= 1:
                raise KDGuardError(f"{name}={getattr(self, name)!r} is outside [0, 1]",
                                   f"set e.g. {name}={getattr(GridJob, name)}")
        self.defense.check_loss_options(list(self.losses))
