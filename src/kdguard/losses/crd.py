"""Contrastive representation distillation: Tian et al., "Contrastive Representation Distillation"
(ICLR 2020), pure parts. The memory bank and embeddings live in
:class:`kdguard.distill.terms.CRDTerm`.

For an anchor embedding ``v`` (unit norm, 128-d) and K + 1 unit-norm memory rows ``w_0..w_K``
(``w_0`` from the same dataset index, the positive; the rest random negatives), the critic scores
are ``h_k = exp(w_kᵀ v / τ) / Z`` (Eq. 19–20, τ = 0.07), with Z a normalisation constant fixed on
the first batch (``Z = mean(exp(·/τ)) · N_data``, reference code). The NCE objective with uniform
noise ``P_n = 1/N_data`` (Eq. 18) is

``L = −1/B Σ_b [ log h_{b,0}/(h_{b,0} + K·P_n) + Σ_{k≥1} log K·P_n/(h_{b,k} + K·P_n) ]``

with an ε = 1e-7 in the denominators as in the reference code. CRD sums it for both anchors
(teacher→student memory and student→teacher memory).
"""

from __future__ import annotations

import torch

from ..errors import KDGuardError
from ._checks import full_precision

_EPS = 1e-7


@full_precision
def contrast_scores(anchor: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """Unnormalised critic ``exp(rowsᵀ anchor / τ)``: anchor ``B×D``, rows ``B×(K+1)×D`` → ``B×(K+1)``."""
    if (rows.dim() != 3 or anchor.dim() != 2 or rows.shape[0] != anchor.shape[0]
            or rows.shape[2] != anchor.shape[1]):
        raise KDGuardError(f"CRD memory rows {tuple(rows.shape)} do not match anchors {tuple(anchor.shape)}",
                           "pass B×(K+1)×D rows for B×D anchors")
    if temperature <= 0:
        raise KDGuardError(f"CRD temperature {temperature!r} must be > 0", "use 0.07")
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


@full_precision
def crd_nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss of CRD (Tian et al. 2020, Eq. 18; reference ``ContrastLoss``).

    Args:
        scores: ``B×(K+1)`` positive critic values ``h`` (already divided by Z), positive in column 0.
        n_data: dataset size N_data (noise probability ``1/N_data``).

    Returns:
        Float32 scalar; the loss summed over positive and K negatives, averaged over the batch.

    Raises:
        KDGuardError: ``scores`` has fewer than 2 columns or ``n_data < 1``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise KDGuardError(f"CRD scores have shape {tuple(scores.shape)}, expected B×(K+1) with K >= 1",
                           "use at least one negative")
    if n_data < 1:
        raise KDGuardError(f"CRD dataset size {n_data!r} must be >= 1", "pass the training-set size")
    x = scores.float()
    k_pn = (x.shape[1] - 1) / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + k_pn + _EPS))
    log_d0 = torch.log(k_pn / (x[:, 1:] + k_pn + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]
