"""Logit distillation: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import KDGuardError

Reduction = Literal["batchmean", "mean", "sum", "none"]


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: Reduction = "batchmean") -> torch.Tensor:
    """KL(p ‖ q) between ``softmax(p_logits/τ)`` and ``softmax(q_logits/τ)``.

    Args:
        p_logits: ``N×K`` logits of the reference distribution (e.g. the teacher).
        q_logits: ``N×K`` logits of the approximating distribution (e.g. the student).
        temperature: τ > 0.
        reduction: ``"batchmean"`` sums over classes and averages over the batch (the
            mathematically correct KL per sample; mdistiller/torchdistill/RepDistiller);
            ``"mean"`` averages over batch × classes (``F.kl_div``'s default, used by the ZSKT
            reference code; it equals batchmean / K); ``"sum"``; ``"none"`` gives the ``N``
            per-sample values.

    Returns:
        A scalar, or an ``N`` tensor for ``reduction="none"``. Not multiplied by τ².

    Raises:
        KDGuardError: shapes differ, τ ≤ 0, or the reduction is unknown.
    """
    if p_logits.shape != q_logits.shape or p_logits.dim() != 2:
        raise KDGuardError(f"logit shapes {tuple(p_logits.shape)} and {tuple(q_logits.shape)} differ "
                           "or are not N×K", "pass teacher and student logits for the same batch")
    if temperature <= 0:
        raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
    log_p = F.log_softmax(p_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=1)
    per_class = log_p.exp() * (log_p - log_q)
    if reduction == "batchmean":
        return per_class.sum() / p_logits.shape[0]
    if reduction == "mean":
        return per_class.mean()
    if reduction == "sum":
        return per_class.sum()
    if reduction == "none":
        return per_class.sum(dim=1)
    raise KDGuardError(f"unknown KL reduction {reduction!r}", "use batchmean, mean, sum or none")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
            reduction: Reduction = "batchmean") -> torch.Tensor:
    """Hinton KD term τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) (Hinton et al. 2015, §2).

    The τ² factor keeps gradient magnitudes comparable across temperatures. Shapes ``N×K``;
    the teacher logits should carry no gradient (detach them or compute under ``no_grad``).
    Combine with cross-entropy as ``α·kd_loss + (1−α)·CE`` (see :class:`kdguard.distill.LogitKD`).
    """
    return kl_divergence(teacher_logits, student_logits, temperature=temperature,
                         reduction=reduction) * temperature**2
