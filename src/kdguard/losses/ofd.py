"""Overhaul of feature distillation (OFD): Heo et al., "A Comprehensive Overhaul of Feature
Distillation" (ICCV 2019), and its reference code ``clovaai/overhaul-distillation``.

OFD distils **pre-ReLU** features. Negative teacher responses carry little information after the
ReLU, so the teacher target is clipped from below by a per-channel *margin* (paper §3.2–3.3):

* ``m_c = E[t | t < 0]`` for ``t ~ N(β_c, γ_c²)``, the distribution of the teacher's pre-ReLU
  batch-norm output for channel c (γ, β: that BN's weight and bias). In closed form
  ``m = β − |γ| · φ(β/|γ|) / Φ(−β/|γ|)`` (a truncated-normal mean; Eq. 2 of the paper). The
  reference code falls back to ``m = −3|γ|`` when ``Φ(−β/|γ|) ≤ 0.001`` (almost no negative mass,
  where the ratio is numerically unstable); so does :func:`ofd_margin`.
* target ``σ_m(t) = max(t, m)`` (Eq. 3);
* **partial L2** distance (Eq. 4): ``(s − σ_m(t))²`` everywhere except where ``s ≤ σ_m(t) ≤ 0``,
  i.e. where the student is already below a non-positive target (ReLU would zero both).

The total loss of the reference code is ``Σ_i d_p(r_i(S_i), σ_m(T_i)) / 2^{n−1−i}`` summed over
all elements, stages i = 0..n−1 (later stages weigh more), then divided by ``1000 · batch`` in the
training script; those two parts live in :class:`kdguard.distill.terms.OFDTerm`.
"""

from __future__ import annotations

import math

import torch

from ..errors import KDGuardError
from ._checks import check_reduction, check_same_batch, check_same_shape, full_precision

REDUCTIONS = ("sum", "batchmean", "mean", "none")

#: the reference code's threshold on Φ(−β/γ) below which the margin falls back to −3γ
MARGIN_FALLBACK_CDF = 1e-3


@full_precision
def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor, *,
               fallback_cdf: float = MARGIN_FALLBACK_CDF) -> torch.Tensor:
    """Per-channel margin ``E[t | t < 0]`` of ``t ~ N(β, γ²)`` (Heo et al. 2019, Eq. 2).

    Args:
        bn_weight: γ, shape ``C`` (the teacher BN's ``weight``; its sign is ignored: ``|γ|``).
        bn_bias: β, shape ``C``.
        fallback_cdf: where ``Φ(−β/|γ|) ≤ fallback_cdf`` the margin is ``−3|γ|`` (reference: 0.001).

    Returns:
        ``C`` float32 tensor of margins (≤ 0), on the input's device. Computed in float64.
        A channel with γ = 0 gets β if β < 0, else 0 (the limits of both branches).

    Raises:
        KDGuardError: the shapes differ or are not 1-D.
    """
    if bn_weight.dim() != 1 or bn_weight.shape != bn_bias.shape:
        raise KDGuardError(f"BN weight and bias shapes {tuple(bn_weight.shape)} and "
                           f"{tuple(bn_bias.shape)} are not the same 1-D shape",
                           "pass a BatchNorm's weight and bias")
    gamma = bn_weight.detach().double().abs().clamp(min=1e-30)
    beta = bn_bias.detach().double()
    z = beta / gamma
    cdf_neg = torch.special.ndtr(-z)                      # Φ(−β/γ) = P(t < 0)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    exact = beta - gamma * pdf / cdf_neg.clamp(min=1e-300)
    margin = torch.where(cdf_neg > fallback_cdf, exact, -3.0 * gamma)
    return margin.float()


@full_precision
def ofd_partial_l2(fs: torch.Tensor, ft: torch.Tensor, margin: torch.Tensor | None, *,
                   reduction: str = "sum") -> torch.Tensor:
    """Partial L2 between student features and margin-clipped teacher features (Eq. 3–4).

    Args:
        fs: student features after the connector ``N×C×H×W`` (pre-ReLU).
        ft: teacher pre-ReLU features ``N×C×H×W``.
        margin: ``C`` per-channel margins (:func:`ofd_margin`), or ``None`` for no clipping.
        reduction: ``"sum"`` over all elements (reference ``distillation_loss``, default),
            ``"batchmean"`` (sum / N), ``"mean"`` (over all elements) or ``"none"``
            (elementwise, ``N×C×H×W``).

    Returns:
        Float32 loss ≥ 0. Zero where ``s ≤ max(t, m) ≤ 0``; in particular zero when
        ``fs == max(ft, m)``.

    Raises:
        KDGuardError: shapes differ, the margin has the wrong length, or an unknown reduction.
    """
    check_reduction(reduction, REDUCTIONS)
    check_same_batch(fs, ft)
    check_same_shape(fs, ft, fix="map the student to the teacher's channels with OFD's connector")
    s, t = fs.float(), ft.float()
    if margin is not None:
        if margin.shape != (t.shape[1],):
            raise KDGuardError(f"OFD margin has shape {tuple(margin.shape)}, expected ({t.shape[1]},)",
                               "compute one margin per teacher channel with ofd_margin")
        t = torch.maximum(t, margin.to(t).view(1, -1, *([1] * (t.dim() - 2))))
    keep = (s > t) | (t > 0)
    loss = (s - t).pow(2) * keep
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / s.shape[0]
    if reduction == "mean":
        return loss.mean()
    return loss
