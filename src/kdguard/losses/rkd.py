"""Relational KD: Park et al., "Relational Knowledge Distillation" (CVPR 2019).

Both losses act on embeddings ``N×D`` (usually the pooled penultimate features; student and
teacher dimensions may differ):

* distance-wise (Eq. 4–5): ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with μ the mean distance over
  the batch's distinct pairs, compared by the Huber loss ``l_δ`` (δ = 1, ``F.smooth_l1_loss``);
* angle-wise (Eq. 6–7): ``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩`` with ``e_ij = (t_i − t_j)/‖t_i − t_j‖``,
  compared by the Huber loss.

The paper *sums* the Huber loss over pairs/triplets; the reference code (and RepDistiller,
mdistiller) *averages* it over all N² (N³) entries, diagonal included. The weights λ_D = 25,
λ_A = 50 (paper §4.1, RepDistiller) were tuned for the average, which is the default here;
``reduction="sum"`` gives the paper's form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_min_batch, check_reduction, check_same_batch, full_precision

REDUCTIONS = ("mean", "sum")


@full_precision
def pairwise_distances(e: torch.Tensor, *, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (``N×D``) → ``N×N`` float32, zero diagonal.

    Squared distances are clamped at ``eps`` before the square root so the gradient stays finite
    for coincident points (as in the reference code).
    """
    e = e.float().flatten(1)
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1.0 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    n = d.shape[0]
    mu = d.sum() / (n * (n - 1))  # mean over the distinct (off-diagonal) pairs
    return d / mu.clamp(min=1e-12)


@full_precision
def rkd_distance_loss(es: torch.Tensor, et: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Distance-wise RKD (Park et al. 2019, Eq. 4–5): Huber(ψ_D(student), ψ_D(teacher)).

    Args:
        es: student embeddings ``N×D_s`` (or ``N×...``, flattened); N ≥ 2.
        et: teacher embeddings ``N×D_t``.
        reduction: ``"mean"`` over the N² entries (reference code, default) or ``"sum"`` (paper).

    Returns:
        Float32 scalar ≥ 0, zero when ``es == et``.

    Raises:
        KDGuardError: batch sizes differ, N < 2, or an unknown reduction.
    """
    check_reduction(reduction, REDUCTIONS)
    check_same_batch(es, et)
    check_min_batch(es, 2, "RKD distance loss")
    return F.smooth_l1_loss(_normalised_distances(es), _normalised_distances(et), reduction=reduction)


@full_precision
def angle_matrix(e: torch.Tensor) -> torch.Tensor:
    """``N×N×N`` cosines ``⟨e_ij, e_kj⟩`` of the angle at vertex j (Park et al. 2019, Eq. 6).

    Entry ``[j, i, k]``; unit vectors ``e_ij`` are zero where ``i == j``.
    """
    e = e.float().flatten(1)
    diff = e[None, :, :] - e[:, None, :]          # [j, i] = t_i − t_j
    unit = F.normalize(diff, p=2.0, dim=2)
    return unit @ unit.transpose(1, 2)


@full_precision
def rkd_angle_loss(es: torch.Tensor, et: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Angle-wise RKD (Park et al. 2019, Eq. 6–7): Huber(ψ_A(student), ψ_A(teacher)).

    Shapes and reductions as in :func:`rkd_distance_loss` (mean over N³ entries by default);
    N ≥ 3. Memory is O(N³ + N²·D); batch sizes of a few hundred are fine.
    """
    check_reduction(reduction, REDUCTIONS)
    check_same_batch(es, et)
    check_min_batch(es, 3, "RKD angle loss")
    return F.smooth_l1_loss(angle_matrix(es), angle_matrix(et), reduction=reduction)


@full_precision
def rkd_loss(es: torch.Tensor, et: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
             reduction: str = "mean") -> torch.Tensor:
    """``λ_D · L_dist + λ_A · L_angle`` with the paper's λ_D = 25, λ_A = 50 (§4.1)."""
    loss = es.new_zeros((), dtype=torch.float32)
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(es, et, reduction=reduction)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(es, et, reduction=reduction)
    return loss
