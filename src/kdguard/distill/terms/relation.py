"""Relational terms on embeddings: RKD, PKT, CC (kernel) and RepDistiller's Correlation.

They compare batch-level structure (distances, angles, similarities), so student and teacher
embedding sizes may differ, except for :class:`CorrelationTerm`, which learns embeddings.
Features with more than one dimension per sample are flattened (``N×C×1×1`` → ``N×C``).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import KDGuardError
from ...losses._checks import full_precision
from ...losses.cc import KERNELS, cc_loss, correlation_loss
from ...losses.pkt import pkt_loss
from ...losses.rkd import rkd_loss
from .base import DistillTerm, check_pairs, per_sample_shapes


class RKDTerm(DistillTerm):
    """Relational KD (Park et al. 2019): ``λ_D·L_dist + λ_A·L_angle``, summed over pairs.

    Args:
        distance_weight, angle_weight: λ_D = 25, λ_A = 50 (paper §4.1; RepDistiller, mdistiller).
        reduction: ``"mean"`` (reference code) or ``"sum"`` (paper) over pairs/triplets.
    """

    def __init__(self, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 reduction: str = "mean", **paths) -> None:
        super().__init__(**paths)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.reduction = reduction

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("RKD", s_feats, t_feats)
        return sum(rkd_loss(s, t, distance_weight=self.distance_weight, angle_weight=self.angle_weight,
                            reduction=self.reduction) for s, t in zip(s_feats, t_feats))


class PKTTerm(DistillTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), summed over pairs.

    Args:
        reduction: ``"mean"`` over N² (reference code, default), ``"batchmean"`` or ``"sum"``.
    """

    def __init__(self, *, reduction: str = "mean", **paths) -> None:
        super().__init__(**paths)
        self.reduction = reduction

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("PKT", s_feats, t_feats)
        return sum(pkt_loss(s, t, reduction=self.reduction) for s, t in zip(s_feats, t_feats))


class CCTerm(DistillTerm):
    """Correlation congruence with the paper's kernel (Peng et al. 2019, Eq. 4–8).

    Args:
        gamma, order: RBF width γ = 0.4 and Taylor order P = 2 (KD-Zoo's settings).
        kernel: ``"taylor"`` (paper) or ``"rbf"`` (exact kernel).
    """

    def __init__(self, *, gamma: float = 0.4, order: int = 2, kernel: str = "taylor", **paths) -> None:
        super().__init__(**paths)
        if kernel not in KERNELS:
            raise KDGuardError(f"unknown CC kernel {kernel!r}", "use 'taylor' or 'rbf'")
        self.gamma, self.order, self.kernel = float(gamma), order, kernel

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("CC", s_feats, t_feats)
        return sum(cc_loss(s, t, gamma=self.gamma, order=self.order, kernel=self.kernel)
                   for s, t in zip(s_feats, t_feats))


class Embed(nn.Module):
    """Linear projection to ``dim`` followed by L2 normalisation (CRD/RepDistiller ``Embed``).

    Input ``N×...`` (flattened), output ``N×dim`` float32 unit vectors. Runs in float32 even under
    autocast: CRD divides dot products of these vectors by τ = 0.07 before ``exp``, which would
    amplify bf16 rounding into percent-level errors of the scores.
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)

    @full_precision
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(f.flatten(1).float()), p=2.0, dim=1)


def flat_dims(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [prod(s) for s in shapes]


class CorrelationTerm(DistillTerm):
    """RepDistiller's simplified "Correlation" loss on learned embeddings (:func:`correlation_loss`).

    Both networks' features are projected by :class:`Embed` (Linear → L2 norm) to ``embed_dim``
    (128). As in RepDistiller, the teacher-side embedding is trainable too
    (``train_teacher_embed=True``); it only sees detached teacher features, so no gradient
    reaches the teacher. Not the paper's CC: see :mod:`kdguard.losses.cc`.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                 embed_dim: int = 128, train_teacher_embed: bool = True, **paths) -> None:
        super().__init__(**paths)
        s_dims = flat_dims(per_sample_shapes(s_shapes, "student"))
        t_dims = flat_dims(per_sample_shapes(t_shapes, "teacher"))
        self.embed_s = nn.ModuleList(Embed(d, embed_dim) for d in s_dims)
        self.embed_t = nn.ModuleList(Embed(d, embed_dim) for d in t_dims)
        self.embed_t.requires_grad_(bool(train_teacher_embed))

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("Correlation", s_feats, t_feats, len(self.embed_s))
        return sum(correlation_loss(es(s.float()), et(t.float()))
                   for es, et, s, t in zip(self.embed_s, self.embed_t, s_feats, t_feats))
