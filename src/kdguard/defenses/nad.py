"""Neural Attention Distillation (NAD): Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks" (ICLR 2021), §3, Eq. 1–3.

Two phases on the defender's clean labelled subset (5 % of the training data in the paper):

1. **Teacher.** A copy of the poisoned model is fine-tuned with cross-entropy (10 epochs by
   default: NAD README / issue #2, BackdoorBench ``te_epochs: 10``).
2. **Student.** The poisoned model itself (default; or any registry architecture built fresh,
   ``nad.student=resnet8``) is trained with

   ``L = CE(S(x), y) + Σ_l β_l · AT(F_S^l, F_T^l)``

   where F^l are the outputs of the residual groups (``stage_paths(model, "stages")``) and AT is
   the KD-Zoo/NAD attention loss (:func:`kdguard.losses.attention.attention_loss`,
   ``variant="nad"``): ``A(F) = Σ_c |F_c|^p`` (p = 2), divided by its Frobenius norm over H×W,
   compared by MSE; maps of different sizes are average-pooled to the smaller one (NAD issue #13).

β defaults: 500/1000/1000 for the three WRN groups (NAD README; BackdoorBench ``beta1..3``; the
shipped NAD ``config.py`` says 0/0/5000). For a model with n stages kdguard uses 500 for the first
and 1000 for every deeper one (LeNet-5: 500/1000; ResNet-18: 500/1000/1000/1000), i.e. the
shallowest map weighs half, as in NAD. The teacher is frozen and always in eval mode
(:class:`kdguard.distill.base.Distiller`); unlike BackdoorBench's NAD, features come from forward
hooks registered once, not from truncated copies of the network rebuilt every batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.base import Distiller
from ..errors import KDGuardError, unknown_name
from ..losses.attention import AT_VARIANTS, attention_loss
from ..models import build_model, stage_paths
from ..runs import RunResult, build_manifest, save_run
from ..taps import FeatureTaps
from .base import register_defense
from .config import DefenseJob
from .runner import finish_defense, prepare_defense

TEACHER_DIR = "nad_teacher"


def default_betas(num_stages: int) -> list[float]:
    """NAD's per-stage weights generalised to ``num_stages``: ``[500, 1000, 1000, ...]``."""
    if num_stages < 1:
        raise KDGuardError("NAD needs at least one feature stage", "give nad.student_paths / nad.teacher_paths")
    return [500.0] + [1000.0] * (num_stages - 1)


def resolve_betas(student_paths: Sequence[str], teacher_paths: Sequence[str],
                  betas: Sequence[float] | None) -> list[float]:
    """Check that the stages pair up and return one β ≥ 0 per pair (default :func:`default_betas`).

    Raises:
        KDGuardError: empty or unequal path lists, a wrong number of betas, or a beta that is
            negative or not finite.
    """
    if not student_paths or len(student_paths) != len(teacher_paths):
        raise KDGuardError(f"NAD got {len(student_paths)} student and {len(teacher_paths)} teacher stages",
                           "give the same, non-zero number of feature paths for both "
                           "(nad.student_paths / nad.teacher_paths)")
    n = len(student_paths)
    out = default_betas(n) if not betas else [float(b) for b in betas]
    if len(out) != n:
        raise KDGuardError(f"NAD got {len(out)} betas for {n} stages",
                           f"give one beta per stage, e.g. nad.betas={default_betas(n)}")
    if any(not (math.isfinite(b) and b >= 0) for b in out):
        raise KDGuardError(f"NAD betas {out} must be finite numbers >= 0", "use e.g. [500, 1000, 1000]")
    return out


class NADDistiller(Distiller):
    """The NAD student objective as a distiller: ``CE + Σ_l β_l · AT_variant(F_S^l, F_T^l)``.

    Args:
        student: the model being erased (float ``N×C×H×W`` in [0, 1] → ``N×K`` logits).
        teacher: the fine-tuned NAD teacher; frozen, eval mode, run under ``no_grad``.
        student_paths, teacher_paths: module paths of the features, aligned pairwise (same
            count); channel counts and spatial sizes may differ between the two.
        betas: one weight β_l ≥ 0 per pair (default :func:`default_betas`).
        p: attention exponent (> 0; 2 in NAD).
        variant: ``"nad"`` (default, KD-Zoo/NAD), ``"zagoruyko"`` or ``"paper"``
            (:mod:`kdguard.losses.attention`).

    Losses returned by ``forward`` in training mode: ``"ce"`` (cross-entropy with the labels,
    skipped when ``y`` is None) and ``"at"`` (the β-weighted sum over stages), float32 scalars.
    Hooks are registered once at construction; :meth:`remove_hooks` takes them off both models.

    Raises:
        KDGuardError: path lists of different lengths or empty, a wrong number of betas, a
            negative beta, an unknown variant or a missing module path.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_paths: Sequence[str],
                 teacher_paths: Sequence[str], betas: Sequence[float] | None = None, p: float = 2.0,
                 variant: str = "nad") -> None:
        super().__init__(student, teacher)
        betas = resolve_betas(student_paths, teacher_paths, betas)
        if variant not in AT_VARIANTS:
            raise unknown_name("attention-transfer variant", variant, AT_VARIANTS)
        if not p > 0:
            raise KDGuardError(f"attention exponent p={p!r} must be > 0", "use NADDistiller(..., p=2) as in NAD")
        self.student_paths, self.teacher_paths = list(student_paths), list(teacher_paths)
        self.betas, self.p, self.variant = betas, float(p), variant
        self._s_taps = FeatureTaps(student, self.student_paths)
        self._t_taps = FeatureTaps(teacher, self.teacher_paths, detach=True)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor | None):
        with torch.no_grad():
            _, t_feats = self._t_taps(x)
        s_logits, s_feats = self._s_taps(x)
        at = sum(beta * attention_loss(s_feats[sp], t_feats[tp], variant=self.variant, p=self.p)
                 for beta, sp, tp in zip(self.betas, self.student_paths, self.teacher_paths))
        losses = {"at": at}
        if y is not None:
            losses["ce"] = F.cross_entropy(s_logits.float(), y)
        return s_logits, losses

    def remove_hooks(self) -> None:
        self._s_taps.remove()
        self._t_taps.remove()

    def extra_repr(self) -> str:
        return f"betas={self.betas}, p={self.p}, variant={self.variant!r}"


@register_defense("nad", title="Neural Attention Distillation", stage="before", clean_fraction=0.05,
                  labels=True, teacher_access=True, source="Li et al., ICLR 2021 (bboylyg/NAD)")
def run_nad(job: DefenseJob, *, threads: int | None = None) -> RunResult:
    """NAD on the poisoned model ``job.model``: fine-tuned teacher, then attention distillation.

    Phase 1 trains in ``job.out/nad_teacher`` (``job.train`` with ``nad.teacher_epochs`` epochs;
    the teacher is saved there with its test metrics); phase 2 trains the student in ``job.out``
    under ``job.train``. Both phases resume from their ``train_state.pt``.

    Raises:
        KDGuardError: bad ``nad`` options (betas, paths, variant, student architecture) or see
            :func:`kdguard.defenses.runner.prepare_defense`.
    """
    cfg = job.nad
    if cfg.teacher_epochs < 1:
        raise KDGuardError(f"nad.teacher_epochs={cfg.teacher_epochs} must be >= 1", "use e.g. 10 (NAD)")
    if cfg.variant not in AT_VARIANTS:
        raise unknown_name("attention-transfer variant", cfg.variant, AT_VARIANTS)
    if not cfg.p > 0:
        raise KDGuardError(f"nad.p={cfg.p!r} must be > 0", "use nad.p=2 as in NAD")
    ctx = prepare_defense(job, threads=threads)
    ds = ctx.data.train
    if cfg.student:
        student = build_model(cfg.student, num_classes=ds.num_classes, in_channels=ds.channels,
                              mean=ds.mean, std=ds.std)
    else:
        student = ctx.model
    s_paths = list(cfg.student_paths) if cfg.student_paths else stage_paths(student, "stages")
    t_paths = list(cfg.teacher_paths) if cfg.teacher_paths else stage_paths(ctx.model, "stages")
    resolve_betas(s_paths, t_paths, list(cfg.betas))  # fail before any training

    teacher = copy.deepcopy(ctx.model)
    t_train = copy.deepcopy(job.train)
    t_train.epochs = cfg.teacher_epochs
    t_dir = ctx.out / TEACHER_DIR
    t_history = ctx.fit(teacher, run_dir=t_dir, desc="nad-teacher", train_cfg=t_train)
    t_metrics = ctx.test_metrics(teacher)
    save_run(t_dir, teacher, build_manifest("nad_teacher", job, head={"seed": job.seed},
                                            links={"poisoned_model": str(job.model)}, model=ctx.spec(teacher),
                                            dataset=ctx.dataset_record(), metrics=t_metrics))

    distiller = NADDistiller(student, teacher, student_paths=s_paths, teacher_paths=t_paths,
                             betas=list(cfg.betas), p=cfg.p, variant=cfg.variant)
    try:
        s_history = ctx.fit(distiller, run_dir=ctx.out, desc="nad-student")
    finally:
        distiller.remove_hooks()
    betas = distiller.betas
    notes = (f"NAD teacher: the poisoned model fine-tuned for {cfg.teacher_epochs} epochs (saved in "
             f"`{TEACHER_DIR}/`). Student: {'the poisoned model' if not cfg.student else cfg.student}, "
             f"CE + Σ β·AT ({cfg.variant} variant, p={cfg.p}) at {s_paths} ← {t_paths}, β = {betas}.")
    return finish_defense(ctx, student, histories={"NAD teacher": t_history, "NAD student": s_history},
                          extra_rows=[("NAD teacher (fine-tuned)", ctx.arch, t_metrics)],
                          extra_manifest={"nad": {"betas": betas, "p": cfg.p, "variant": cfg.variant,
                                                  "student_paths": s_paths, "teacher_paths": t_paths,
                                                  "teacher_dir": TEACHER_DIR, "teacher_metrics": t_metrics}},
                          notes=notes)
