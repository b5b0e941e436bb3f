"""FitNets hint loss: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), Eq. 2.

The paper's hint-training objective is ``½ ‖u_h(x) − r(v_g(x))‖²``: the teacher's hint-layer
output ``u_h`` against the student's guided-layer output passed through a learnable regressor
``r`` (the connector, owned by :class:`kdguard.distill.terms.FitNetTerm`). The paper trains the
hint in a separate first stage; the common KD benchmarks (RepDistiller, mdistiller) instead add
``β · MSE`` (mean over all elements) to the CE loss with β = 100, which is what the registry's
``fitnet`` method does. The reduction is a parameter so the paper's per-sample sum is available.
"""

from __future__ import annotations

import torch

from ._checks import check_reduction, check_same_batch, check_same_shape, full_precision

REDUCTIONS = ("mean", "batchmean", "sum")


@full_precision
def hint_loss(fs: torch.Tensor, ft: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Squared error between (connected) student features and teacher hint features.

    Args:
        fs: student features after the connector, any shape ``N×...``.
        ft: teacher features, the same shape (no gradient needed).
        reduction: ``"mean"`` over all elements (``F.mse_loss``; RepDistiller/mdistiller,
            default); ``"batchmean"``: sum over features, mean over the batch (the paper's
            ``‖·‖²`` per sample, without its ½); ``"sum"`` over everything.

    Returns:
        Float32 scalar ≥ 0, zero iff ``fs == ft``.

    Raises:
        KDGuardError: the shapes differ (add a connector) or the reduction is unknown.
    """
    check_reduction(reduction, REDUCTIONS)
    check_same_batch(fs, ft)
    check_same_shape(fs, ft)
    sq = (fs.float() - ft.float()).pow(2)
    if reduction == "mean":
        return sq.mean()
    if reduction == "batchmean":
        return sq.sum() / fs.shape[0]
    return sq.sum()
