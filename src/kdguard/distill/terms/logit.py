"""Logit terms: Hinton KD and decoupled KD (no features needed)."""

from __future__ import annotations

import torch

from ...errors import KDGuardError
from ...losses.dkd import dkd_loss
from ...losses.logit import kd_loss
from .base import DistillTerm


class KDTerm(DistillTerm):
    """Hinton KD ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` (Hinton et al. 2015; :func:`kd_loss`).

    Args:
        temperature: τ > 0 (4, the usual CIFAR setting of RepDistiller/mdistiller).
        reduction: KL reduction (``"batchmean"`` by default; ``"mean"`` is ZSKT's, 1/K smaller).
    """

    uses_features = False

    def __init__(self, *, temperature: float = 4.0, reduction: str = "batchmean") -> None:
        super().__init__(student_paths=[], teacher_paths=[])
        if temperature <= 0:
            raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        return kd_loss(s_logits, t_logits, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DKDTerm(DistillTerm):
    """Decoupled KD ``w(e) · τ²(α·TCKD + β·NCKD)`` (Zhao et al., CVPR 2022; :func:`dkd_loss`).

    Needs labels. Defaults α = 1, β = 8, τ = 4 (mdistiller CIFAR-100). ``w(e)`` is the linear
    warm-up of the reference code (mdistiller ``DKD``: ``min(epoch / warmup, 1)`` with 1-based
    epochs, ``warmup`` = 20): in the 0-based epoch ``e`` the loss is scaled by
    ``min((e + 1) / warmup_epochs, 1)``. The paper's Eq. 8 has no warm-up; ``warmup_epochs=0``
    gives it. Without the warm-up, β·τ² = 128 makes the NCKD gradient at the start of training
    large enough that a ResNet-8 student at lr 0.1 collapsed onto one class (CIFAR-10, 5 % clean
    data; ``docs/losses.md``). The trainer sets the epoch through :meth:`on_epoch_start`; until
    it is called the term is in epoch 0 (scale ``1 / warmup_epochs``).

    Raises:
        KDGuardError: τ ≤ 0, or ``warmup_epochs`` < 0.
    """

    uses_features = False
    needs_labels = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: float = 20.0) -> None:
        super().__init__(student_paths=[], teacher_paths=[])
        if temperature <= 0:
            raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
        if not warmup_epochs >= 0:
            raise KDGuardError(f"DKD warmup_epochs {warmup_epochs!r} must be >= 0",
                               "use 20 (the reference code) or 0 (no warm-up, the paper's Eq. 8)")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup_epochs = float(warmup_epochs)
        self.on_epoch_start(0)

    def on_epoch_start(self, epoch: int) -> None:
        self.scale = min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        if y is None:
            raise KDGuardError("DKD needs the labels of the batch", "call the distiller as distiller(x, y)")
        return self.scale * dkd_loss(s_logits, t_logits, y, alpha=self.alpha, beta=self.beta,
                                     temperature=self.temperature)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"warmup_epochs={self.warmup_epochs:g}")
