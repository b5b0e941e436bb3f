"""Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer" (arXiv 1707.01219, 2017).

Each channel's spatial map, flattened and L2-normalised, is one sample ``f^{k·} ∈ R^{HW}`` of a
distribution over "neuron selectivity patterns". NST matches the teacher's and the student's sets
of patterns with the squared maximum mean discrepancy (paper Eq. 3–4):

``MMD² = 1/C_T² Σ_{i,i'} k(t_i, t_i') + 1/C_S² Σ_{j,j'} k(s_j, s_j') − 2/(C_T C_S) Σ_{i,j} k(t_i, s_j)``

with the polynomial kernel ``k(x, y) = (xᵀy + c)^d``, d = 2, c = 0 (the paper's best setting).
The channel counts may differ; the spatial sizes must match, so the larger map is adaptive-average
pooled to the smaller (as in RepDistiller). The MMD is computed per sample and averaged over the
batch. RepDistiller's weight is 50. ``full=False`` drops the teacher–teacher term, which is
constant for the student (RepDistiller keeps it, so the loss is a true MMD ≥ 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KDGuardError
from ._checks import check_dims, check_same_batch, full_precision, match_spatial


@full_precision
def poly_kernel(a: torch.Tensor, b: torch.Tensor, *, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Batched Gram matrix ``(a_i · b_j + c)^d``: ``N×P×M`` and ``N×Q×M`` → ``N×P×Q``."""
    return (a @ b.transpose(1, 2) + c).pow(degree)


@full_precision
def nst_loss(fs: torch.Tensor, ft: torch.Tensor, *, degree: int = 2, c: float = 0.0,
             full: bool = True) -> torch.Tensor:
    """Squared MMD between channel patterns with a polynomial kernel (Huang & Wang 2017, Eq. 4).

    Args:
        fs: student features ``N×C_s×H_s×W_s``.
        ft: teacher features ``N×C_t×H_t×W_t``.
        degree, c: polynomial kernel ``(xᵀy + c)^d`` (d = 2, c = 0 in the paper).
        full: include the teacher–teacher term (constant for the student).

    Returns:
        Float32 scalar; ≥ 0 and zero when ``fs == ft`` for ``full=True``.

    Raises:
        KDGuardError: non-4-D features, different batch sizes, or ``degree < 1``.
    """
    check_dims("student NST features", fs, (4,))
    check_dims("teacher NST features", ft, (4,))
    check_same_batch(fs, ft)
    if not isinstance(degree, int) or degree < 1:
        raise KDGuardError(f"NST polynomial degree {degree!r} must be an integer >= 1",
                           "use nst_loss(fs, ft, degree=2)")
    fs, ft = match_spatial(fs, ft)
    s = F.normalize(fs.float().flatten(2), p=2.0, dim=2)
    t = F.normalize(ft.float().flatten(2), p=2.0, dim=2)
    kw = dict(degree=degree, c=c)
    per_sample = poly_kernel(s, s, **kw).mean((1, 2)) - 2.0 * poly_kernel(s, t, **kw).mean((1, 2))
    if full:
        per_sample = per_sample + poly_kernel(t, t, **kw).mean((1, 2))
    return per_sample.mean()
