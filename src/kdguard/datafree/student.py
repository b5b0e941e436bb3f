"""The student side of a data-free run: its distillation loss and the replaceable update step.

Two extension points live here (ABD plugs into both, see ``docs/datafree.md``):

``sample_weighting(per_sample, x, teacher_logits) -> {name: scalar}``
    turns the per-sample distillation losses (``N``) into the named scalar losses that are
    minimised. Default :func:`mean_weighting` (``{"kd": per_sample.mean()}``), i.e. the
    reference reduction. ABD's OOD variant of the Shuffling Vaccine replaces it by
    ``mean(kept) − coef·mean(suspicious)``.
``student_step(ctx) -> {name: scalar}``
    performs one student update on ``ctx.x`` and returns its (detached or not) named losses.
    Default :func:`default_student_step`. ABD's Self-Retrospection replaces it: it can compute
    its own perturbation and hypergradient, then call ``ctx.distill_losses()`` and
    ``ctx.clip_and_step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..errors import KDGuardError
from ..losses.attention import attention_loss
from ..train.engine import clip_and_step, optimizer_step, trained_parameters
from .losses import kl_per_sample, l1_per_sample


@dataclass
class TeacherOutputs:
    """The teacher's view of one batch: logits ``N×K`` and tapped features (path → tensor)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DistillObjective:
    """The student's loss on a synthetic batch: a per-sample logit divergence (+ attention).

    Args:
        divergence: ``"kl"`` (KL(T^τ ‖ S^τ)) or ``"l1"`` (mean |s − t|, DFAD).
        temperature: τ for ``kl``.
        reduction: ``"batchmean"`` (sum over classes) or ``"mean"`` (÷ K) for ``kl``.
        t2_scale: multiply by τ² (Hinton; the CMI code's ``KLDiv``); ZSKT and OOD do not.
        at_beta: weight β of the attention-transfer term (ZSKT: 250; 0 = off).
        at_variant: attention-transfer variant of :func:`kdguard.losses.attention.attention_loss`.
        teacher_paths, student_paths: matching stage paths for attention transfer.

    Losses: ``kd`` (via the sample weighting) and, with ``at_beta > 0``, ``at`` =
    β · Σ_stages AT(student stage, teacher stage) (ZSKT ``KT_loss_student``).
    """

    divergence: str = "kl"
    temperature: float = 1.0
    reduction: str = "batchmean"
    t2_scale: bool = False
    at_beta: float = 0.0
    at_variant: str = "zagoruyko"
    teacher_paths: list[str] = field(default_factory=list)
    student_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.divergence not in ("kl", "l1"):
            raise KDGuardError(f"student divergence {self.divergence!r} is not kl or l1",
                               "use kl (ZSKT, DAFL, CMI, OOD) or l1 (DFAD)")
        if self.temperature <= 0:
            raise KDGuardError(f"KD temperature {self.temperature!r} must be > 0", "use e.g. 1, 8 or 20")
        if self.at_beta > 0 and len(self.teacher_paths) != len(self.student_paths):
            raise KDGuardError(f"attention transfer needs as many teacher as student stages, got "
                               f"{len(self.teacher_paths)} and {len(self.student_paths)}",
                               "pick a student of the teacher's family or set zskt.at_beta=0")

    @property
    def uses_features(self) -> bool:
        return self.at_beta > 0

    def per_sample(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """Per-sample divergence (float32 ``N``) whose mean is the reference's loss."""
        if self.divergence == "l1":
            return l1_per_sample(teacher_logits, student_logits)
        per = kl_per_sample(teacher_logits, student_logits, temperature=self.temperature,
                            reduction=self.reduction)
        return per * self.temperature**2 if self.t2_scale else per

    def feature_losses(self, teacher_feats: dict[str, torch.Tensor],
                       student_feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"at": β·Σ AT}`` when attention transfer is on, else ``{}``."""
        if self.at_beta <= 0:
            return {}
        total = sum(attention_loss(student_feats[s], teacher_feats[t], variant=self.at_variant)
                    for t, s in zip(self.teacher_paths, self.student_paths))
        return {"at": self.at_beta * total}


class SampleWeighting(Protocol):
    def __call__(self, per_sample: torch.Tensor, x: torch.Tensor,
                 teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]: ...


def mean_weighting(per_sample: torch.Tensor, x: torch.Tensor,
                   teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The default sample weighting: ``{"kd": mean over the batch}``."""
    return {"kd": per_sample.mean()}


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on ``module``'s parameters (restored afterwards).

    Used when gradients must flow *through* a network to its input but not into its weights (the
    student during a generator step): it skips the weight-gradient work and leaves ``.grad``
    untouched.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class StudentStepContext:
    """Everything one student update needs; handed to the ``student_step`` callable.

    Attributes:
        student, teacher: the models (teacher frozen, eval mode).
        optimizer: the student's optimiser.
        x: the synthetic batch, float ``N×C×H×W`` in the models' input space, no grad.
        teacher_outputs: the teacher's logits (and features) for ``x``, computed once per batch in
            inference mode (reused across steps on the same batch).
        objective: the method's :class:`DistillObjective`.
        sample_weighting: see the module docstring.
        student_taps: taps of the student's stage paths when the objective uses features.
        grad_clip: max global gradient norm (``None`` = off).
        autocast: context-manager factory for the forward passes (bf16 or no-op).
        round_index, total_rounds: where the run is (0-based round, budget), e.g. for defences
            that act only late in training.
        params: the tensors whose gradient norm is clipped, in the optimiser's param-group order
            (``None``: every tensor ``optimizer`` updates).
    """

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    teacher_outputs: TeacherOutputs
    objective: DistillObjective
    sample_weighting: SampleWeighting = mean_weighting
    student_taps: Callable | None = None
    grad_clip: float | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    round_index: int = 0
    total_rounds: int = 1
    params: Sequence[torch.Tensor] | None = None

    def forward_student(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits (and stage features when the objective needs them) for ``x`` (default
        ``self.x``), with gradients."""
        x = self.x if x is None else x
        with self.autocast():
            if self.student_taps is not None:
                return self.student_taps(x)
            return self.student(x), {}

    def distill_losses(self, student_outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
                       ) -> dict[str, torch.Tensor]:
        """The method's named student losses on ``self.x`` (with gradients), from
        ``student_outputs`` (logits, features) of :meth:`forward_student` if already computed."""
        s_logits, s_feats = student_outputs if student_outputs is not None else self.forward_student()
        t = self.teacher_outputs
        per = self.objective.per_sample(t.logits, s_logits)
        losses = dict(self.sample_weighting(per, self.x, t.logits))
        losses.update(self.objective.feature_losses(t.features, s_feats))
        return losses

    def clip_and_step(self) -> None:
        """Clip the student's gradient norm (if configured) and take the optimiser step."""
        clip_and_step(self.optimizer, self._clipped(), self.grad_clip)

    def _clipped(self) -> Sequence[torch.Tensor]:
        return self.params if self.params is not None else trained_parameters(self.optimizer)

    def backward_and_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Zero the gradients, back-propagate the sum of ``losses``, clip and step."""
        total = sum(losses.values())
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise KDGuardError("the student losses carry no gradient",
                               "return losses computed from the student's outputs")
        optimizer_step(self.optimizer, total, self._clipped(), self.grad_clip)


StudentStep = Callable[[StudentStepContext], dict[str, torch.Tensor]]


def default_student_step(ctx: StudentStepContext) -> dict[str, torch.Tensor]:
    """One plain distillation update: ``losses = ctx.distill_losses()``, backward, clip, step."""
    losses = ctx.distill_losses()
    ctx.backward_and_step(losses)
    return losses
