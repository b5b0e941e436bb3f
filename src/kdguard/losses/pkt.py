"""Probabilistic knowledge transfer: Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer" (ECCV 2018).

Each sample's embedding defines a conditional distribution over the other samples of the batch
through the cosine-similarity kernel ``K(a, b) = (cos(a, b) + 1)/2`` (paper Eq. 9), normalised
per row: ``p_{j|i} = K(t_i, t_j) / Σ_k K(t_i, t_k)``. The loss is the KL divergence between the
teacher's and the student's conditionals (Eq. 10). Student and teacher dimensions may differ.

Follows the authors' code (also in RepDistiller): the row normalisation includes the sample
itself (k = i), a small ε guards both the L2 normalisation and the log ratio, and the KL terms
are **averaged** over the N² entries (``reduction="mean"``; the weight 30000 of RepDistiller is
tuned for this). ``reduction="sum"`` sums them as in the paper's Eq. 10.
"""

from __future__ import annotations

import torch

from ._checks import check_reduction, check_same_batch, full_precision

REDUCTIONS = ("mean", "batchmean", "sum")


@full_precision
def cosine_conditionals(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-stochastic ``N×N`` matrix ``p_{j|i}`` from embeddings ``N×D`` (PKT, Eq. 9)."""
    e = e.float().flatten(1)
    e = e / (e.norm(p=2, dim=1, keepdim=True) + eps)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@full_precision
def pkt_loss(es: torch.Tensor, et: torch.Tensor, *, eps: float = 1e-7,
             reduction: str = "mean") -> torch.Tensor:
    """PKT loss ``Σ_ij p^T_{j|i} log((p^T_{j|i} + ε)/(p^S_{j|i} + ε))`` (Passalis & Tefas 2018, Eq. 10).

    Args:
        es: student embeddings ``N×D_s`` (flattened if more dims).
        et: teacher embeddings ``N×D_t``.
        eps: ε of the reference code (1e-7).
        reduction: ``"mean"`` over N² entries (reference code, default); ``"batchmean"``: sum over
            j, mean over i (the mean per-sample KL); ``"sum"`` (paper).

    Returns:
        Float32 scalar; zero when ``es == et`` (and ≥ 0 up to the ε terms).

    Raises:
        KDGuardError: batch sizes differ or the reduction is unknown.
    """
    check_reduction(reduction, REDUCTIONS)
    check_same_batch(es, et)
    p_s, p_t = cosine_conditionals(es, eps), cosine_conditionals(et, eps)
    terms = p_t * torch.log((p_t + eps) / (p_s + eps))
    if reduction == "mean":
        return terms.mean()
    if reduction == "batchmean":
        return terms.sum() / es.shape[0]
    return terms.sum()
