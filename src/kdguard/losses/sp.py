"""Similarity-preserving KD: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

For a mini-batch of b samples, the activations ``Q ∈ R^{b×(C·H·W)}`` of a layer give the
b×b similarity matrix ``G = Q Qᵀ``, each row L2-normalised (paper Eq. 2–3). The loss compares
student and teacher matrices: ``1/b² · ‖G_T − G_S‖_F²`` (Eq. 4), summed over layer pairs. The
channel counts and spatial sizes of student and teacher may differ: only b×b matrices meet.
Weight γ = 3000 in the paper's CIFAR experiments, RepDistiller and mdistiller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_same_batch, full_precision


@full_precision
def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised batch similarity ``normalize(Q Qᵀ)`` of ``N×...`` features → ``N×N`` float32."""
    q = f.float().flatten(1)
    return F.normalize(q @ q.t(), p=2.0, dim=1)


@full_precision
def sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """SP loss ``‖G_s − G_t‖_F² / N²`` (Tung & Mori 2019, Eq. 4) for one layer pair.

    Args:
        fs: student features ``N×...`` (any shape after the batch dimension).
        ft: teacher features ``N×...``.

    Returns:
        Float32 scalar ≥ 0; zero when ``fs == ft``.

    Raises:
        KDGuardError: the batch sizes differ.
    """
    check_same_batch(fs, ft)
    diff = similarity_matrix(fs) - similarity_matrix(ft)
    return diff.pow(2).sum() / fs.shape[0] ** 2
