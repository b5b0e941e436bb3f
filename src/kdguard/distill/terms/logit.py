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
    """Decoupled KD ``τ²(α·TCKD + β·NCKD)`` (Zhao et al., CVPR 2022; :func:`dkd_loss`).

    Needs labels. mdistiller ramps the DKD weight linearly over the first 20 epochs; the
    distiller's term weights are plain floats (``FeatureDistiller.set_weight``), so a trainer can
    apply such a warm-up. Defaults α = 1, β = 8, τ = 4 (mdistiller CIFAR-100).
    """

    uses_features = False
    needs_labels = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__(student_paths=[], teacher_paths=[])
        if temperature <= 0:
            raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        if y is None:
            raise KDGuardError("DKD needs the labels of the batch", "call the distiller as distiller(x, y)")
        return dkd_loss(s_logits, t_logits, y, alpha=self.alpha, beta=self.beta,
                        temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
