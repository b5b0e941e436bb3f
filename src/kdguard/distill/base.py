"""The distiller contract (after mdistiller's design).

A distiller is an ``nn.Module`` holding a student and a frozen teacher. Its ``forward(x, y)`` in
training returns ``(student_logits, {loss_name: scalar})``; the trainer optimises the sum of the
losses and logs each term. The teacher is always in eval mode (its BatchNorm statistics never
drift) and its parameters never receive gradients. Parameters of auxiliary modules (connectors,
projection heads) belong to the distiller and are optimised with the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError, check_range
from ..losses.logit import kd_loss


class Distiller(nn.Module):
    """Base class: student + frozen teacher.

    Args:
        student: the model being trained; takes float images in [0, 1], ``N×C×H×W``.
        teacher: the (possibly backdoored) model; same input convention, frozen here.

    Raises:
        KDGuardError: ``student is teacher`` (a silent wiring bug in some data-free code bases).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        if student is teacher:
            raise KDGuardError("the student and the teacher are the same object",
                               "pass a separate student model")
        self.student = student
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # always: a teacher in train mode updates its BN running stats
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters plus those of auxiliary modules; never the teacher's."""
        teacher_ids = {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in teacher_ids and p.requires_grad]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Training forward: ``(student_logits N×K, {name: scalar loss})``. Eval: logits only."""
        if not self.training:
            return self.student(x)
        return self.forward_train(x, y)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor | None):  # pragma: no cover
        raise NotImplementedError


class LogitKD(Distiller):
    """Hinton logit KD: ``α·τ²·KL(T^τ‖S^τ) + (1−α)·CE(S, y)`` (Hinton et al. 2015).

    Args:
        temperature: τ > 0 (default 4).
        alpha: weight α ∈ [0, 1] of the KD term; the CE term gets 1 − α and is skipped when
            α = 1 or no labels are given (unlabelled / proxy data). With α = 0 only ``ce`` is
            returned and the teacher is not run (a student-on-labels control at no teacher cost).

    Losses returned: ``kd`` and, when used, ``ce`` (already weighted).

    Raises:
        KDGuardError: α outside [0, 1], τ ≤ 0, or α = 0 without labels.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 4.0,
                 alpha: float = 0.9) -> None:
        super().__init__(student, teacher)
        check_range("KD alpha", alpha, 0.0, 1.0)
        if temperature <= 0:
            raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
        self.temperature = temperature
        self.alpha = alpha

    def forward_train(self, x: torch.Tensor, y: torch.Tensor | None):
        if self.alpha == 0.0:  # CE alone (a no-teacher control): the teacher is never run
            if y is None:
                raise KDGuardError("logit KD with alpha=0 trains on cross-entropy alone, which needs labels",
                                   "give labelled data or set alpha > 0")
            s_logits = self.student(x)
            return s_logits, {"ce": F.cross_entropy(s_logits.float(), y)}
        t_logits = self.teacher_logits(x)
        s_logits = self.student(x)
        losses = {"kd": self.alpha * kd_loss(s_logits, t_logits, temperature=self.temperature)}
        if y is not None and self.alpha < 1.0:
            losses["ce"] = (1.0 - self.alpha) * F.cross_entropy(s_logits.float(), y)
        return s_logits, losses
