"""Teacher repairs used as baselines in RobustKD's comparison: fine-pruning and NAD.

Both repair the (possibly backdoored) teacher on the defender's clean labelled data *before*
an ordinary distillation (``benchmarks/robustkd_compare.py`` distils with Hinton KD from the
repaired teacher). They are compact reimplementations for that comparison, not full defence
packages.

**Fine-pruning** (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018): rank the channels of the last convolutional stage
by their mean activation on clean data and prune them in increasing order (dormant first) until
clean accuracy on held-out clean data would drop by more than ``max_acc_drop``; then fine-tune
the pruned model. Pruning is a fixed mask on the stage output (``M = 1``, ``P = 0`` in a
:class:`~.detox.FeatureDetox`, as BackdoorBench masks ``layer4``), so the pruned teacher is saved
as weights plus a detox file.

**NAD** (Li et al., "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021): fine-tune a copy of the backdoored model on clean data (the NAD teacher,
5–10 epochs in the authors' answer to their issue #2), then train the backdoored model with
``CE + Σ_l β_l · AT(F_S^l, F_T^l)`` (the ``"nad"`` attention variant of
:mod:`kdguard.losses.attention`; β = 500, 1000, 1000 for WRN's three groups; the first stage gets
500 and the others 1000 for any stage count). The NAD code trains with lr 0.1 for two epochs and
then 0.01; here one constant rate (``lr``, default 0.01) is used for both steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...config import OptimConfig, TrainConfig
from ...data import ImageDataset
from ...distill.feature import FeatureDistiller
from ...distill.terms import ATTerm
from ...errors import KDGuardError, check_range
from ...metrics import evaluate_backdoor
from ...models.stages import stage_paths
from ...train import Trainer
from .detox import FeatureDetox
from .stats import clean_feature_stats


@dataclass
class PruneResult:
    """Fine-pruning's outcome: the pruned, fine-tuned model and its fixed pruning mask."""

    model: nn.Module
    prune: FeatureDetox
    layer: str
    pruned: list[int] = field(default_factory=list)
    ratio: float = 0.0
    clean_acc_before: float = 0.0
    clean_acc_pruned: float = 0.0


def _accuracy(model: nn.Module, data: ImageDataset, device: torch.device) -> float:
    return evaluate_backdoor(model, data.images, data.labels, device=device, batch_size=512).ca


def _finetune_cfg(epochs: int, lr: float, batch_size: int, device: str) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, device=device, progress=False,
                       optim=OptimConfig(lr=lr, schedule="constant", weight_decay=5e-4, momentum=0.9))


def fine_prune(teacher: nn.Module, clean: ImageDataset, *, layer: str | None = None, max_acc_drop: float = 0.05,
               max_ratio: float = 0.9, step: float = 0.05, holdout: float = 0.1, finetune_epochs: int = 10,
               lr: float = 0.01, batch_size: int = 128, device: str = "cpu", seed: int = 0,
               run_dir=None) -> PruneResult:
    """Fine-prune a copy of ``teacher`` (the original is not modified).

    Args:
        teacher: the model; ``N×C×H×W`` floats in [0, 1] → logits.
        clean: the defender's clean labelled data (uint8 images).
        layer: the stage whose output channels are pruned (default: the last ``stages`` path).
        max_acc_drop: largest allowed drop of held-out clean accuracy (fraction, 0.05).
        max_ratio, step: prune at most this share of channels, in steps of ``step``.
        holdout: share of ``clean`` kept out of fine-tuning to measure the accuracy drop.
        finetune_epochs, lr, batch_size: SGD fine-tuning of the pruned model on the rest.
        device, seed: where to run; the seed of the hold-out split and the fine-tuning.
        run_dir: where the fine-tuning keeps its resumable state (None: nowhere).

    Returns:
        :class:`PruneResult`; attach ``result.prune`` to ``result.model`` to use it.

    Raises:
        KDGuardError: bad fractions, or a layer whose output is not a 4-D feature map.
    """
    check_range("max_acc_drop", max_acc_drop, 0.0, 1.0)
    check_range("max_ratio", max_ratio, 0.0, 1.0, high_open=True)
    check_range("prune step", step, 0.0, 1.0, low_open=True)
    dev = torch.device(device)
    model = copy.deepcopy(teacher).to(dev).eval()
    layer = layer or list(stage_paths(model, "stages"))[-1]
    rest, held = clean.split(holdout, seed=seed)
    stats = clean_feature_stats(model, [layer], rest.images, device=dev)[layer]
    c, h, w = stats.shape
    order = stats.act_mean.argsort().tolist()  # dormant first
    prune = FeatureDetox({layer: (c, h, w)}, granularity="channel", init_mask=0.0).to(dev)
    base = _accuracy(model, held, dev)
    chosen: list[int] = []
    acc_pruned = base
    with prune.attach(model):
        ratio = step
        while ratio <= max_ratio + 1e-9:
            n = int(round(ratio * c))
            trial = torch.zeros(c, 1, 1)
            trial[order[:n]] = 1.0
            prune.stages[0].set_mask(trial)
            acc = _accuracy(model, held, dev)
            if base - acc > max_acc_drop:
                break
            chosen, acc_pruned = order[:n], acc
            ratio += step
        final = torch.zeros(c, 1, 1)
        final[chosen] = 1.0
        prune.stages[0].set_mask(final)
        prune.freeze()
        if finetune_epochs > 0:
            Trainer(model, _finetune_cfg(finetune_epochs, lr, batch_size, device), run_dir=run_dir, seed=seed,
                    desc="fine-pruning").fit(rest.images, rest.labels)
    model.eval()
    return PruneResult(model, prune, layer, chosen, len(chosen) / c, base, acc_pruned)


def nad_repair(teacher: nn.Module, clean: ImageDataset, *, paths: Sequence[str] | None = None,
               betas: Sequence[float] | None = None, finetune_epochs: int = 10, nad_epochs: int = 20,
               lr: float = 0.01, batch_size: int = 64, device: str = "cpu", seed: int = 0,
               run_dir=None) -> nn.Module:
    """NAD-erase a copy of ``teacher`` (the original is not modified); returns it in eval mode.

    Args:
        teacher: the backdoored model.
        clean: the defender's clean labelled data.
        paths: stages for the attention loss (default: the model's ``stages`` preset).
        betas: one weight per stage (default 500 for the first, 1000 for the others).
        finetune_epochs: epochs to fine-tune the NAD teacher (NAD: 5–10).
        nad_epochs: epochs of attention distillation (NAD: 20).
        lr, batch_size: SGD settings (constant lr; NAD: batch 64).
        device, seed: where to run, the training seed.
        run_dir: a directory for resumable state (subfolders ``nad_teacher``/``nad_student``).

    Raises:
        KDGuardError: ``betas`` and ``paths`` differ in length, or bad epochs.
    """
    paths = list(paths) if paths is not None else list(stage_paths(teacher, "stages"))
    betas = list(betas) if betas is not None else [500.0] + [1000.0] * (len(paths) - 1)
    if len(betas) != len(paths):
        raise KDGuardError(f"NAD got {len(betas)} betas for {len(paths)} stages", "give one beta per stage")
    sub = (lambda name: Path(run_dir) / name) if run_dir is not None else (lambda name: None)
    nad_teacher = copy.deepcopy(teacher)
    if finetune_epochs > 0:
        Trainer(nad_teacher, _finetune_cfg(finetune_epochs, lr, batch_size, device), run_dir=sub("nad_teacher"),
                seed=seed, desc="NAD teacher").fit(clean.images, clean.labels)
    student = copy.deepcopy(teacher)
    terms = {f"at{i + 1}": (float(b), ATTerm(variant="nad", student_paths=[p], teacher_paths=[p]))
             for i, (p, b) in enumerate(zip(paths, betas))}
    distiller = FeatureDistiller(student, nad_teacher.eval(), terms=terms, ce_weight=1.0)
    try:
        if nad_epochs > 0:
            Trainer(distiller, _finetune_cfg(nad_epochs, lr, batch_size, device), run_dir=sub("nad_student"),
                    seed=seed, desc="NAD").fit(clean.images, clean.labels)
    finally:
        distiller.close()
    return student.eval()
