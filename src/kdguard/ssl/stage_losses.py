"""The six stage-distillation losses of paper 1's study (Han et al., arXiv 2403.03846), per stage pair.

Each loss compares the outputs of matching encoder stages ``S_l`` (student) and ``T_l`` (teacher),
weighted per stage: ``Σ_l w_l · L(S_l, T_l)`` (:class:`StageLoss`). The standard form of each loss
is the default; where paper 1's code (``wssun/SSLBackdoorMitigation``) computes something else,
that version is a ``variant`` option (see ``docs/ssl.md``):

=======  ==========================================  ==========  ====================================
name     standard form (default)                     weight      paper-1-code variant
=======  ==========================================  ==========  ====================================
at       attention transfer, NAD/KD-Zoo map + MSE    1000/stage  same (``variant="nad"``)
afd      attention-weighted feature MSE, MLP trained 1000/stage  ``train_attention=False`` (never trained)
fitnet   MSE of the stage maps (same shapes)         1000/stage  same
cc       kernel correlation congruence (Peng 2019)   100/stage   ``variant="correlation"`` (RepDistiller)
kd       τ²·KL of the channel softmax, τ = 0.5       1000, 1st   same (``layer1`` only)
sp       similarity preserving (Tung & Mori 2019)    3000/stage  ``variant="output"``: no stage term,
                                                                 only the output cosine (w₅ = 1)
=======  ==========================================  ==========  ====================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distill.terms.feature import ChannelAttention
from ..errors import KDGuardError, check_range
from ..losses.afd import afd_loss, normalize_channel_attention
from ..losses.attention import AT_VARIANTS, attention_loss
from ..losses.cc import cc_loss, correlation_loss
from ..losses.fitnet import hint_loss
from ..losses.logit import kl_divergence
from ..losses.sp import sp_loss
from ..registry import Registry


def feature_kd_loss(fs: torch.Tensor, ft: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Feature-level KD of paper 1's ``KD`` mode: ``τ² · KL(softmax(T/τ) ‖ softmax(S/τ))`` over channels.

    For stage maps ``N×C×H×W`` the softmax runs over the C channels at every position and the KL is
    summed over channels and positions, divided by N (KD-Zoo's ``DistillKL`` with ``batchmean``, as
    paper 1 applies it to ``layer1``; τ = 0.5). Vectors ``N×C`` are the plain Hinton KD term.

    Args:
        fs, ft: student/teacher features of the same shape, 2-D or 4-D.
        temperature: τ > 0.

    Returns:
        Float32 scalar ≥ 0, zero when ``fs == ft``.

    Raises:
        KDGuardError: shapes differ or are not 2-D/4-D, or τ ≤ 0.
    """
    if fs.shape != ft.shape or fs.dim() not in (2, 4):
        raise KDGuardError(f"feature KD needs equal N×C or N×C×H×W shapes, got {tuple(fs.shape)} and "
                           f"{tuple(ft.shape)}", "use a student of the teacher's architecture")
    n = fs.shape[0]
    if fs.dim() == 4:  # one C-way distribution per sample and position
        fs = fs.permute(0, 2, 3, 1).reshape(-1, fs.shape[1])
        ft = ft.permute(0, 2, 3, 1).reshape(-1, ft.shape[1])
    return kl_divergence(ft, fs, temperature=temperature, reduction="sum") * temperature ** 2 / n


@dataclass(frozen=True)
class LossSpec:
    """One stage-distillation loss of the study.

    Attributes:
        name, title: registry name and description.
        weight: default per-stage weight (paper 1's code where it has one).
        first_stage_only: the default puts the weight on the shallowest stage only (paper 1's KD).
        same_shape: student and teacher stage maps must have the same shape.
        options: accepted ``loss_options`` and their defaults.
        source: paper and reference code.
    """

    name: str
    title: str
    weight: float
    first_stage_only: bool
    same_shape: bool
    options: dict[str, Any]
    source: str


LOSSES: Registry[LossSpec] = Registry("SSL distillation loss")
for _spec in (
    LossSpec("at", "attention transfer", 1000.0, False, False, {"variant": "nad", "p": 2.0},
             "Zagoruyko & Komodakis ICLR 2017; variant 'nad' = paper 1's KDistill_ZOO/AT.py (weight 1000)"),
    LossSpec("afd", "attention-based feature distillation", 1000.0, False, True,
             {"att_f": 2.0, "train_attention": True},
             "Wang et al. ICLR 2020 via KD-Zoo / paper 1's AFD.py (weight 1000); attention MLP trained "
             "(paper 1's code re-creates it untrained each epoch: train_attention=false)"),
    LossSpec("fitnet", "FitNet hints (MSE)", 1000.0, False, True, {"reduction": "mean"},
             "Romero et al. ICLR 2015; paper 1's FitNet mode (MSE on every stage, weight 1000)"),
    LossSpec("cc", "correlation congruence", 100.0, False, False,
             {"variant": "kernel", "gamma": 0.4, "order": 2},
             "Peng et al. ICCV 2019, Gaussian kernel by Taylor expansion (KD-Zoo γ=0.4, P=2, λ=100); "
             "variant 'correlation' = paper 1's RepDistiller Correlation (its weight: 1000)"),
    LossSpec("kd", "feature-level KD (channel softmax)", 1000.0, True, True, {"temperature": 0.5},
             "Hinton et al. 2015 on feature maps, as paper 1's KD mode (layer1 only, τ=0.5, weight 1000)"),
    LossSpec("sp", "similarity preserving", 3000.0, False, False, {"variant": "standard"},
             "Tung & Mori ICCV 2019, Eq. 4 (γ=3000); variant 'output' = paper 1's SP mode, which only "
             "uses the output-feature cosine term (stage weights 0, output weight 1)"),
):
    LOSSES.add(_spec.name, _spec)


def default_stage_weights(loss: str, num_stages: int) -> list[float]:
    """Paper-1-style default weights of ``loss`` for ``num_stages`` stages (shallow to deep)."""
    spec = LOSSES.get(loss)
    if spec.first_stage_only:
        return [spec.weight] + [0.0] * (num_stages - 1)
    return [spec.weight] * num_stages


_VARIANTS = {"at": tuple(AT_VARIANTS), "cc": ("kernel", "correlation"), "sp": ("standard", "output")}


def _options(spec: LossSpec, given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        raise KDGuardError(f"unknown option(s) {', '.join(map(repr, unknown))} for loss {spec.name!r}",
                           f"its options are: {', '.join(spec.options) or 'none'}")
    return {**spec.options, **given}


def check_options(loss: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``loss`` with ``given`` applied: its defaults overridden, names and variant
    checked (without building the loss).

    Raises:
        KDGuardError: unknown loss, option or variant, or AFD's ``att_f`` outside (0, 64].
    """
    spec = LOSSES.get(loss)
    opts = _options(spec, dict(given))
    allowed = _VARIANTS.get(spec.name)
    if allowed and opts["variant"] not in allowed:
        raise KDGuardError(f"unknown {spec.name} variant {opts['variant']!r}", f"use one of {', '.join(allowed)}")
    if spec.name == "afd":
        check_range("AFD att_f", float(opts["att_f"]), 0.0, 64.0, low_open=True)
    return opts


class StageLoss(nn.Module):
    """``Σ_l w_l · L(S_l, T_l)`` for one loss of :data:`LOSSES` over aligned stage pairs.

    Args:
        loss: a name of :data:`LOSSES`.
        s_shapes, t_shapes: per-sample stage shapes ``C×H×W`` of student and teacher.
        weights: one weight ≥ 0 per stage (stages with weight 0 are skipped).
        options: loss options (see each :class:`LossSpec`; unknown keys are an error).

    Holds the learnable parts (AFD's channel-attention MLPs, one per stage).

    Raises:
        KDGuardError: unknown loss/option/variant, a weight count other than the stage count, a
            negative weight, or stage shapes that the loss cannot compare.
    """

    def __init__(self, loss: str, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]],
                 weights: Sequence[float], options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.spec = LOSSES.get(loss)
        self.loss = self.spec.name
        self.opts = check_options(self.loss, dict(options or {}))
        s_shapes = [tuple(s) for s in s_shapes]
        t_shapes = [tuple(t) for t in t_shapes]
        if len(s_shapes) != len(t_shapes):
            raise KDGuardError(f"student has {len(s_shapes)} stages and teacher {len(t_shapes)}",
                               "use a student whose architecture has the teacher's number of stages")
        if len(weights) != len(t_shapes) or any(w < 0 for w in weights):
            raise KDGuardError(f"stage weights {list(weights)!r} must be {len(t_shapes)} values >= 0",
                               f"give one weight per stage ({len(t_shapes)}), or null for the default")
        if self.spec.same_shape and s_shapes != t_shapes:
            raise KDGuardError(f"loss {self.loss!r} needs equal student and teacher stage shapes, got "
                               f"{s_shapes} and {t_shapes}", "use a student of the teacher's architecture, "
                               "or a shape-free loss (at, cc, sp)")
        self.weights = [float(w) for w in weights]
        self._check_variant()
        if self.loss == "afd":
            self.attention = nn.ModuleList(ChannelAttention(t[0], float(self.opts["att_f"])) for t in t_shapes)
            self.attention.requires_grad_(bool(self.opts["train_attention"]))

    def _check_variant(self) -> None:
        if self.loss == "sp" and self.opts["variant"] == "output" and any(self.weights):
            raise KDGuardError("sp variant 'output' uses no stage term but stage weights are non-zero",
                               "set defense.stage_weights to zeros and defense.output_weight=1")

    @property
    def active(self) -> bool:
        return any(w > 0 for w in self.weights)

    def pair_loss(self, i: int, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of stage pair ``i`` (float32 scalar)."""
        o = self.opts
        if self.loss == "at":
            return attention_loss(fs, ft, variant=o["variant"], p=float(o["p"]))
        if self.loss == "afd":
            rho = normalize_channel_attention(self.attention[i](ft))
            return afd_loss(fs, ft, rho)
        if self.loss == "fitnet":
            return hint_loss(fs, ft, reduction=o["reduction"])
        if self.loss == "cc":
            if o["variant"] == "correlation":
                return correlation_loss(fs, ft)
            return cc_loss(fs, ft, gamma=float(o["gamma"]), order=int(o["order"]))
        if self.loss == "kd":
            return feature_kd_loss(fs, ft, float(o["temperature"]))
        return sp_loss(fs, ft)

    def forward(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum over stages; ``s_feats``/``t_feats`` are aligned ``N×C×H×W`` lists."""
        if len(s_feats) != len(self.weights) or len(t_feats) != len(self.weights):
            raise KDGuardError(f"{self.loss} got {len(s_feats)}/{len(t_feats)} stage maps for "
                               f"{len(self.weights)} weights", "tap every stage of both encoders")
        total = s_feats[0].new_zeros((), dtype=torch.float32)
        with torch.autocast(s_feats[0].device.type, enabled=False):  # losses in float32 under bf16 autocast
            for i, (w, fs, ft) in enumerate(zip(self.weights, s_feats, t_feats)):
                if w > 0:
                    total = total + w * self.pair_loss(i, fs.float(), ft.float())
        return total
