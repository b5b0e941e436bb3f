"""The interface every distillation term implements.

A *term* is an ``nn.Module`` that turns what one training step produced (tapped student and
teacher features, both models' logits, labels, dataset indices) into one scalar loss. It owns
any learnable parts of its method (connectors, attention MLPs, CRD embeddings and memory), so
their parameters are optimised with the student by :class:`kdguard.distill.FeatureDistiller`.
Terms never see the models themselves: features come from forward hooks
(:class:`kdguard.taps.FeatureTaps`), so any model with named modules works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ...errors import KDGuardError


class DistillTerm(nn.Module):
    """Base class of distillation terms.

    Class attributes (what the distiller must supply):
        uses_features: the term reads tapped features (False for logit-only terms).
        needs_labels: ``y`` must be given (DKD).
        needs_index: ``index``, the dataset indices of the batch, must be given (CRD).

    Args:
        student_paths, teacher_paths: module paths this term reads, aligned pairwise. ``None``
            means "the distiller's default paths". :func:`kdguard.distill.build_distiller` sets
            them per term, so methods needing different layers can be combined.

    Subclasses implement :meth:`forward`; a term whose weight follows the training schedule
    (DKD's warm-up) also overrides :meth:`on_epoch_start`.
    """

    uses_features: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    needs_index: ClassVar[bool] = False

    def __init__(self, *, student_paths: Sequence[str] | None = None,
                 teacher_paths: Sequence[str] | None = None) -> None:
        super().__init__()
        self.student_paths = None if student_paths is None else list(student_paths)
        self.teacher_paths = None if teacher_paths is None else list(teacher_paths)
        if (self.student_paths is not None and self.teacher_paths is not None
                and len(self.student_paths) != len(self.teacher_paths)):
            raise KDGuardError(
                f"{type(self).__name__} got {len(self.student_paths)} student paths and "
                f"{len(self.teacher_paths)} teacher paths", "give one student path per teacher path")

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before epoch ``epoch`` (0-based) runs; the default does nothing.

        Terms keep no schedule state of their own beyond what this sets, so a resumed run that
        calls it again for the epoch it resumes at is in the same state as an uninterrupted one.
        """

    def forward(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], *,
                s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor | None,
                index: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        """Return the (unweighted) scalar loss of this term.

        Args:
            s_feats: student features, one tensor per path (with gradient).
            t_feats: teacher features, aligned with ``s_feats`` (detached).
            s_logits: ``N×K`` student logits (with gradient).
            t_logits: ``N×K`` teacher logits (detached).
            y: ``N`` int64 labels, or ``None`` for unlabelled data.
            index: ``N`` int64 dataset indices of the samples, or ``None``.
        """
        raise NotImplementedError


def check_pairs(term: str, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor],
                expected: int | None = None) -> None:
    """Raise unless the student and teacher feature lists pair up (and have ``expected`` items)."""
    if len(s_feats) != len(t_feats) or not s_feats:
        raise KDGuardError(f"{term} got {len(s_feats)} student and {len(t_feats)} teacher features",
                           "give the same, non-zero number of student and teacher paths")
    if expected is not None and len(s_feats) != expected:
        raise KDGuardError(f"{term} was built for {expected} feature pairs but got {len(s_feats)}",
                           "rebuild the term for the paths the distiller taps")


def per_sample_shapes(shapes: Sequence[Sequence[int]], what: str) -> list[tuple[int, ...]]:
    """Validate a list of per-sample feature shapes (no batch dimension)."""
    out = [tuple(int(d) for d in s) for s in shapes]
    if not out or any(len(s) == 0 or min(s) < 1 for s in out):
        raise KDGuardError(f"{what} shapes {out} are empty or invalid",
                           "pass the per-sample shapes found by kdguard.distill.feature_shapes")
    return out
