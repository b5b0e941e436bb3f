"""Correlation congruence: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019),
and the simplified "Correlation" loss of RepDistiller that is often distributed under the same name.

**CC (paper).** Each batch of embeddings gives an N×N correlation matrix ``ψ(F)_ij = k(F_i, F_j)``
(Eq. 5–6). The paper uses a Gaussian RBF kernel ``k(x, y) = exp(−γ‖x − y‖²)`` and approximates
it by a P-order Taylor expansion (Eq. 8): for L2-normalised features ``‖x − y‖² = 2 − 2xᵀy``, so
``k(x, y) = e^{−2γ} Σ_{p=0}^{P} (2γ)^p / p! · (xᵀy)^p``. The loss is
``L_CC = 1/N² · ‖ψ(F_T) − ψ(F_S)‖²`` (Eq. 4), an MSE over the matrix entries. γ = 0.4 and P = 2
are the settings of Knowledge-Distillation-Zoo's CC (weight λ = 100), used as defaults.
Student and teacher dimensions may differ: only N×N matrices are compared.

**Correlation (RepDistiller).** RepDistiller's ``Correlation`` class is documented as CC but
computes ``mean_i Σ_d |Δ_i,d| · |Δ_{i+1},d|`` with ``Δ = f_s − f_t`` (products of the
differences of *consecutive* samples of the batch), on learned 128-d embeddings of both networks
(weight β = 0.02). It is not the kernel loss of the paper, depends on the batch order, and needs
student and teacher embeddings of the same size. Paper 1 (SSLBackdoorMitigation, ``--distill_way
CC``) uses this variant on raw stage features. It is available as :func:`correlation_loss` and the
registry method ``correlation``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KDGuardError
from ._checks import check_min_batch, check_same_batch, check_same_shape, full_precision

KERNELS = ("taylor", "rbf")


@full_precision
def correlation_matrix(f: torch.Tensor, *, gamma: float = 0.4, order: int = 2,
                       kernel: str = "taylor") -> torch.Tensor:
    """``N×N`` kernel correlation matrix of L2-normalised embeddings (Peng et al. 2019, Eq. 6–8).

    Args:
        f: embeddings ``N×D`` (flattened if more dims); each row is L2-normalised first.
        gamma: RBF width γ > 0 (0.4).
        order: Taylor order P ≥ 0 (2); ignored for ``kernel="rbf"``.
        kernel: ``"taylor"`` (the paper's approximation) or ``"rbf"`` (the exact Gaussian kernel
            ``exp(−γ‖x − y‖²)`` of the normalised rows).

    Returns:
        Float32 ``N×N`` symmetric matrix.

    Raises:
        KDGuardError: γ ≤ 0, P < 0 or an unknown kernel.
    """
    if gamma <= 0:
        raise KDGuardError(f"CC kernel width gamma={gamma!r} must be > 0", "use correlation_matrix(f, gamma=0.4)")
    if kernel not in KERNELS:
        raise KDGuardError(f"unknown CC kernel {kernel!r}", "use 'taylor' or 'rbf'")
    if kernel == "taylor" and (not isinstance(order, int) or order < 0):
        raise KDGuardError(f"CC Taylor order {order!r} must be an integer >= 0", "use correlation_matrix(f, order=2)")
    x = F.normalize(f.float().flatten(1), p=2.0, dim=1)
    sim = x @ x.t()
    if kernel == "rbf":
        return torch.exp(-gamma * (2.0 - 2.0 * sim).clamp(min=0.0))
    out = torch.zeros_like(sim)
    for p in range(order + 1):
        out = out + (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return math.exp(-2.0 * gamma) * out


@full_precision
def cc_loss(es: torch.Tensor, et: torch.Tensor, *, gamma: float = 0.4, order: int = 2,
            kernel: str = "taylor") -> torch.Tensor:
    """CC loss ``mean_ij (ψ_S − ψ_T)²`` (Peng et al. 2019, Eq. 4), i.e. ``‖ψ_T − ψ_S‖²/N²``.

    Args:
        es, et: student/teacher embeddings ``N×D_s`` and ``N×D_t``.
        gamma, order, kernel: see :func:`correlation_matrix`.

    Returns:
        Float32 scalar ≥ 0; zero when ``es == et``.

    Raises:
        KDGuardError: batch sizes differ, or a bad kernel option.
    """
    check_same_batch(es, et)
    diff = (correlation_matrix(es, gamma=gamma, order=order, kernel=kernel)
            - correlation_matrix(et, gamma=gamma, order=order, kernel=kernel))
    return diff.pow(2).mean()


@full_precision
def correlation_loss(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """RepDistiller's simplified "Correlation": ``mean_i Σ_d |Δ_i| ⊙ |Δ_{i+1}|``, ``Δ = es − et``.

    Args:
        es, et: embeddings of the **same** shape ``N×D`` (flattened if more dims), N ≥ 2.

    Returns:
        Float32 scalar ≥ 0; zero when ``es == et``. Depends on the order of the batch.

    Raises:
        KDGuardError: the shapes differ or N < 2.
    """
    check_same_batch(es, et)
    check_same_shape(es, et, fix="embed both to the same dimension (the 'correlation' method does)")
    check_min_batch(es, 2, "the Correlation loss")
    delta = (es.float() - et.float()).flatten(1).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()
