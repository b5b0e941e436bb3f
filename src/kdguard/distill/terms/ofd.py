"""OFD term: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019).

See :mod:`kdguard.losses.ofd` for the margin and the partial L2 distance. This term adds the
learnable connectors (Conv1×1 + BN, student → teacher channels), the stage weights and the
normalisation, and :func:`teacher_margins` reads the margins off the teacher's BatchNorm layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import KDGuardError
from ...losses.ofd import ofd_margin, ofd_partial_l2
from ...taps import resolve_module
from .base import DistillTerm, check_pairs, per_sample_shapes
from .connectors import Connector

NORMALIZATIONS = ("reference", "batch", "none")
STAGE_WEIGHTS = ("reference", "uniform")

_BN = (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm)


def _bn_for(teacher: nn.Module, path: str, channels: int) -> tuple[str, nn.Module] | None:
    """The BatchNorm whose statistics describe the pre-ReLU feature at ``path``.

    The module at ``path`` itself if it is a BN (e.g. WRN's ``bn1``/``bn_final``). Otherwise, as
    in the reference ``get_bn_before_relu`` for residual blocks, the last BN registered directly
    in the parent module (e.g. ``layer1.2.bn2`` for the pre-ReLU residual sum ``layer1.2.preact``).
    """
    module = resolve_module(teacher, path)
    if isinstance(module, _BN):
        return path, module
    parent_path = path.rpartition(".")[0]
    parent = resolve_module(teacher, parent_path)
    candidates = [(name, m) for name, m in parent.named_children()
                  if isinstance(m, _BN) and m.num_features == channels and m.affine]
    if not candidates:
        return None
    name, bn = candidates[-1]
    return (f"{parent_path}.{name}" if parent_path else name), bn


def teacher_margins(teacher: nn.Module, teacher_paths: Sequence[str], channels: Sequence[int], *,
                    margin_paths: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Per-stage margins ``m_c = E[t | t < 0]`` from the teacher's batch-norm layers.

    Args:
        teacher: the teacher model.
        teacher_paths: paths of the tapped pre-ReLU teacher features.
        channels: channel count of each tapped feature.
        margin_paths: explicit BN module paths, one per teacher path (overrides the search).

    Returns:
        One ``C`` float32 margin tensor per path (:func:`kdguard.losses.ofd_margin`).

    Raises:
        KDGuardError: no affine BatchNorm with the right channel count can be found for a path,
            or a ``margin_paths`` entry is not such a BatchNorm.
    """
    if margin_paths is not None and len(margin_paths) != len(teacher_paths):
        raise KDGuardError(f"OFD got {len(margin_paths)} margin paths for {len(teacher_paths)} teacher paths",
                           "give one BatchNorm path per teacher feature path")
    margins = []
    for i, (path, c) in enumerate(zip(teacher_paths, channels)):
        if margin_paths is not None:
            bn = resolve_module(teacher, margin_paths[i])
            usable = isinstance(bn, _BN) and bn.affine and bn.num_features == c
            found = (margin_paths[i], bn) if usable else None
        else:
            found = _bn_for(teacher, path, c)
        if found is None:
            raise KDGuardError(
                f"OFD found no affine BatchNorm with {c} channels for teacher feature {path!r}",
                "tap the pre-ReLU BatchNorm outputs, name the BN before each ReLU in margin_paths "
                "(kd.options.margin_paths=[...] in a distill job), or turn the margin off "
                "(kd.options.margin=none; distill.margin=none in a robustkd job)")
        margins.append(ofd_margin(found[1].weight, found[1].bias))
    return margins


class OFDTerm(DistillTerm):
    """OFD loss ``norm · Σ_i w_i · d_p(r_i(S_i), max(T_i, m_i))`` over pre-ReLU stage features.

    Args:
        s_shapes, t_shapes: per-sample shapes ``C×H×W`` of the pre-ReLU feature pairs.
        margins: one ``C_t`` margin tensor per pair (:func:`teacher_margins`), or ``None`` for
            no clipping (plain partial L2 against the raw teacher features).
        normalization: ``"reference"`` divides the summed loss by ``1000 · batch`` (the reference
            training script; mdistiller's weight 0.001 with a per-batch mean is the same),
            ``"batch"`` by the batch size only, ``"none"`` keeps the raw sum.
        stage_weights: ``"reference"``: ``1/2^{n−1−i}`` for stage i = 0..n−1 (last stage 1, the
            one before ½, ...); ``"uniform"``: all 1.

    Connectors: Conv1×1 (no bias) + BN from student to teacher channels on every pair, as in the
    reference code (even when the channel counts match). If the spatial sizes differ the
    student map is average-pooled to the teacher's first (an extension; the reference assumes
    equal sizes).
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                 margins: Sequence[torch.Tensor] | None, normalization: str = "reference",
                 stage_weights: str = "reference", **paths) -> None:
        super().__init__(**paths)
        s_shapes = per_sample_shapes(s_shapes, "student")
        t_shapes = per_sample_shapes(t_shapes, "teacher")
        if any(len(s) != 3 for s in s_shapes + t_shapes):
            raise KDGuardError("OFD needs pre-ReLU feature maps (C×H×W) at every tapped path",
                               "tap BatchNorm / pre-activation outputs of convolutional stages")
        if normalization not in NORMALIZATIONS:
            raise KDGuardError(f"unknown OFD normalization {normalization!r}",
                               f"use one of: {', '.join(NORMALIZATIONS)}")
        if stage_weights not in STAGE_WEIGHTS:
            raise KDGuardError(f"unknown OFD stage_weights {stage_weights!r}", "use 'reference' or 'uniform'")
        self.connectors = nn.ModuleList(Connector(s, t, bn=True) for s, t in zip(s_shapes, t_shapes))
        n = len(t_shapes)
        self.stage_weights = ([1.0 / 2 ** (n - 1 - i) for i in range(n)] if stage_weights == "reference"
                              else [1.0] * n)
        self.normalization = normalization
        self.use_margin = margins is not None
        if margins is not None:
            if len(margins) != n or any(m.shape != (t[0],) for m, t in zip(margins, t_shapes)):
                raise KDGuardError("OFD margins do not match the teacher features' channels",
                                   "compute them with teacher_margins for the same paths")
            for i, m in enumerate(margins):
                self.register_buffer(f"margin{i}", m.detach().float().clone())

    def margin(self, i: int) -> torch.Tensor | None:
        return getattr(self, f"margin{i}") if self.use_margin else None

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("OFD", s_feats, t_feats, len(self.connectors))
        total = s_logits.new_zeros((), dtype=torch.float32)
        for i, (conn, s, t) in enumerate(zip(self.connectors, s_feats, t_feats)):
            stage = ofd_partial_l2(conn(s), t, self.margin(i), reduction="sum")
            total = total + self.stage_weights[i] * stage
        batch = s_feats[0].shape[0]
        if self.normalization == "reference":
            return total / (1000.0 * batch)
        if self.normalization == "batch":
            return total / batch
        return total

    def extra_repr(self) -> str:
        return (f"normalization={self.normalization!r}, stage_weights={self.stage_weights}, "
                f"margin={self.use_margin}")
