"""Feature-map terms: FitNet, attention transfer, similarity preserving, NST and AFD.

Each sums its loss over the aligned (student, teacher) feature pairs it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import KDGuardError, unknown_name
from ...losses.afd import afd_loss, normalize_channel_attention
from ...losses.attention import AT_VARIANTS, attention_loss
from ...losses.fitnet import hint_loss
from ...losses.nst import nst_loss
from ...losses.sp import sp_loss
from .base import DistillTerm, check_pairs, per_sample_shapes
from .connectors import connectors_for


class FitNetTerm(DistillTerm):
    """FitNets hints (Romero et al. 2015): ``Σ_i MSE(r_i(S_i), T_i)``.

    Args:
        s_shapes, t_shapes: per-sample feature shapes of the pairs (from a dry run).
        connector: ``"auto"`` (a Conv1×1+BN regressor where the shapes differ, none where they
            match, like paper 1's same-architecture FitNet), ``"always"`` or ``"none"``.
            RepDistiller's ``ConvReg`` adds a ReLU after the BN; here there is none, because the
            stage outputs of pre-activation networks (WRN) are signed residual sums.
        reduction: see :func:`kdguard.losses.hint_loss` (``"mean"`` = RepDistiller/mdistiller).
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                 connector: str = "auto", reduction: str = "mean", **paths) -> None:
        super().__init__(**paths)
        s_shapes = per_sample_shapes(s_shapes, "student")
        t_shapes = per_sample_shapes(t_shapes, "teacher")
        self.connectors = connectors_for(s_shapes, t_shapes, mode=connector)
        self.reduction = reduction

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("FitNet", s_feats, t_feats, len(self.connectors))
        return sum(hint_loss(r(s), t, reduction=self.reduction)
                   for r, s, t in zip(self.connectors, s_feats, t_feats))


class ATTerm(DistillTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017): ``Σ_i attention_loss(S_i, T_i)``.

    Args:
        variant: ``"zagoruyko"`` (authors' code, default), ``"nad"`` (KD-Zoo/NAD) or ``"paper"``
            (Eq. 2); see :mod:`kdguard.losses.attention` for how they differ.
        p: exponent of the attention map (2).
    """

    def __init__(self, *, variant: str = "zagoruyko", p: float = 2.0, **paths) -> None:
        super().__init__(**paths)
        if variant not in AT_VARIANTS:
            raise unknown_name("attention-transfer variant", variant, AT_VARIANTS)
        self.variant, self.p = variant, float(p)

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("AT", s_feats, t_feats)
        return sum(attention_loss(s, t, variant=self.variant, p=self.p) for s, t in zip(s_feats, t_feats))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, p={self.p}"


class SPTerm(DistillTerm):
    """Similarity-preserving KD (Tung & Mori 2019, Eq. 4), summed over the feature pairs."""

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("SP", s_feats, t_feats)
        return sum(sp_loss(s, t) for s, t in zip(s_feats, t_feats))


class NSTTerm(DistillTerm):
    """Neuron selectivity transfer (Huang & Wang 2017): polynomial-kernel MMD², summed over pairs.

    Args:
        degree, c: kernel ``(xᵀy + c)^d`` (2, 0).
        full: keep the teacher–teacher term (constant; makes the value a true MMD²).
    """

    def __init__(self, *, degree: int = 2, c: float = 0.0, full: bool = True, **paths) -> None:
        super().__init__(**paths)
        self.degree, self.c, self.full = degree, float(c), bool(full)

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("NST", s_feats, t_feats)
        return sum(nst_loss(s, t, degree=self.degree, c=self.c, full=self.full)
                   for s, t in zip(s_feats, t_feats))


class ChannelAttention(nn.Module):
    """AFD's SE-style attention: GAP → Conv1×1(C→C·f) → ReLU → Conv1×1(C·f→C) → logits ``N×C``.

    Init as in KD-Zoo / paper 1: He-normal (fan-out) weights, zero biases.
    """

    def __init__(self, channels: int, att_f: float) -> None:
        super().__init__()
        mid = max(1, int(channels * att_f))
        self.mlp = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(),
                                 nn.Conv2d(mid, channels, 1))
        for m in self.mlp.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, ft: torch.Tensor) -> torch.Tensor:
        pooled = ft.float().mean(dim=(2, 3), keepdim=True)
        return self.mlp(pooled).flatten(1)


class AFDTerm(DistillTerm):
    """Attention-based feature distillation as in paper 1's code (:mod:`kdguard.losses.afd`).

    Per stage, a :class:`ChannelAttention` on the teacher's features gives the channel weights ρ
    of the weighted MSE between spatially normalised student and teacher features.

    Deviation from the reference, on purpose: paper 1 builds the attention modules inside its
    ``train()`` function, so they get fresh random weights every epoch and are never optimised.
    Here they are built once and, with ``train_attention=True`` (default), trained with the student.
    Note the objective then also moves ρ: minimising ``Σ_c ρ_c e_c`` over ρ shifts attention
    toward the channels the student already matches. ``train_attention=False`` keeps the modules
    frozen at their random initialisation, which is the reference's behaviour within one epoch.

    Student and teacher stages normally have the same shape (same architecture); otherwise a
    Conv1×1+BN :class:`~kdguard.distill.terms.connectors.Connector` maps the student to the
    teacher's shape (an extension).

    Args:
        s_shapes, t_shapes: per-sample shapes ``C×H×W`` of the stage pairs.
        att_f: hidden width factor of the attention MLP (paper 1's code: 2; KD-Zoo's example: 1).
        train_attention: optimise the attention MLPs (True) or freeze them (False, reference).
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                 att_f: float = 2.0, train_attention: bool = True, **paths) -> None:
        super().__init__(**paths)
        s_shapes = per_sample_shapes(s_shapes, "student")
        t_shapes = per_sample_shapes(t_shapes, "teacher")
        if any(len(s) != 3 for s in s_shapes + t_shapes):
            raise KDGuardError("AFD needs feature maps (C×H×W) at every tapped path",
                               "tap convolutional stages, not pooled vectors")
        if att_f <= 0:
            raise KDGuardError(f"AFD att_f={att_f!r} must be > 0", "use 2 (paper 1) or 1 (KD-Zoo)")
        self.attention = nn.ModuleList(ChannelAttention(t[0], att_f) for t in t_shapes)
        self.connectors = connectors_for(s_shapes, t_shapes, mode="auto")
        self.train_attention = bool(train_attention)
        self.attention.requires_grad_(self.train_attention)

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("AFD", s_feats, t_feats, len(self.attention))
        total = s_logits.new_zeros((), dtype=torch.float32)
        for att, conn, s, t in zip(self.attention, self.connectors, s_feats, t_feats):
            rho = normalize_channel_attention(att(t))
            total = total + afd_loss(conn(s), t, rho)
        return total

    def extra_repr(self) -> str:
        return f"train_attention={self.train_attention}"

