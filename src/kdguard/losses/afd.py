"""Attention-based feature distillation (AFD) as implemented in paper 1's code.

Origin: the AFD part of AFDS, Wang et al., "Pay Attention to Features, Transfer Learn Faster CNNs"
(ICLR 2020). Knowledge-Distillation-Zoo replaced the paper's attention with an SE-style block,
and paper 1 (Han et al. 2024, ``wssun/SSLBackdoorMitigation``, ``KDistill_ZOO/AFD.py``) copied
that version. For one stage with teacher features ``F_T`` (``N×C×H×W``):

1. channel attention ``ρ = sigmoid(MLP(GAP(F_T)))`` with the MLP Conv1×1(C→C·f) → ReLU →
   Conv1×1(C·f→C), rescaled to sum to 1 over channels;
2. per-channel spatially normalised features ``F̄ = F / (‖F‖_{H,W} + 1e-6)``;
3. ``L = mean_n Σ_c ρ_{n,c} · mean_{h,w} (F̄_S − F̄_T)²``.

This module holds the pure parts (steps 2–3 and the rescaling in 1); the MLP is a learnable
module owned by :class:`kdguard.distill.terms.AFDTerm`, which documents how it is trained.
"""

from __future__ import annotations

import torch

from ..errors import KDGuardError
from ._checks import check_dims, check_same_batch, check_same_shape, full_precision

_EPS = 1e-6  # KD-Zoo / paper 1: ``fm / (norm + eps)``


@full_precision
def normalize_channel_attention(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)`` rescaled to sum to 1 over channels: ``N×C`` → ``N×C`` (rows sum to 1)."""
    check_dims("AFD attention logits", logits, (2,))
    rho = torch.sigmoid(logits.float())
    return rho / rho.sum(dim=1, keepdim=True)


@full_precision
def spatial_normalize(fm: torch.Tensor) -> torch.Tensor:
    """Divide each channel of ``N×C×H×W`` by its Frobenius norm over H×W (+1e-6)."""
    fm = fm.float()
    return fm / (fm.norm(p=2, dim=(2, 3), keepdim=True) + _EPS)


@full_precision
def afd_loss(fs: torch.Tensor, ft: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Attention-weighted MSE of spatially normalised features (paper 1's ``AFD.forward``).

    Args:
        fs: student features ``N×C×H×W`` (after any connector).
        ft: teacher features ``N×C×H×W``.
        rho: channel weights ``N×C``, non-negative, rows summing to 1
            (see :func:`normalize_channel_attention`).

    Returns:
        Float32 scalar ≥ 0; zero when ``fs == ft``.

    Raises:
        KDGuardError: shapes differ or ``rho`` is not ``N×C``.
    """
    check_dims("student AFD features", fs, (4,))
    check_same_batch(fs, ft)
    check_same_shape(fs, ft)
    if rho.shape != fs.shape[:2]:
        raise KDGuardError(f"AFD attention has shape {tuple(rho.shape)}, expected {tuple(fs.shape[:2])}",
                           "compute one weight per sample and teacher channel")
    per_channel = (spatial_normalize(fs) - spatial_normalize(ft)).pow(2).mean(dim=(2, 3))
    return (rho.float() * per_channel).sum(dim=1).mean()
