"""Loss terms of the data-free methods, each a pure function with its source and reduction.

Divergences between teacher logits ``t`` and student logits ``s`` (``N×K``) are returned *per
sample* where the caller may need to reweight samples (ABD's OOD variant); ``.mean()`` of the
per-sample vector equals the reference's reduction:

* ``kl_per_sample(t, s, τ, "batchmean")`` = Σ_k KL terms of each sample (mean → ``batchmean``);
* ``kl_per_sample(t, s, τ, "mean")`` = the same divided by K (mean → ``F.kl_div(..., 'mean')``,
  the ZSKT and OOD reference codes);
* ``l1_per_sample(t, s)`` = mean_k |s − t| (mean → ``F.l1_loss``, DFAD).

Sign conventions are explicit in the names: every function returns a quantity to be
*minimised*; adversarial terms that *maximise* a divergence are called ``negative_*``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KDGuardError
from ..losses.logit import kl_divergence


def kl_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *,
                  temperature: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per sample, scaled so its mean is the named reduction.

    Args:
        teacher_logits, student_logits: ``N×K``.
        temperature: τ > 0 (no τ² factor here; callers add it where the reference does).
        reduction: ``"batchmean"`` (sum over classes) or ``"mean"`` (divided by K).

    Returns:
        Float32 ``N`` vector, ≥ 0.

    Raises:
        KDGuardError: shape mismatch, τ ≤ 0 or unknown reduction.
    """
    if reduction not in ("batchmean", "mean"):
        raise KDGuardError(f"KL reduction {reduction!r} is not batchmean or mean",
                           "use batchmean (sum over classes) or mean (÷ classes, ZSKT/OOD code)")
    per = kl_divergence(teacher_logits, student_logits, temperature=temperature, reduction="none")
    return per / teacher_logits.shape[1] if reduction == "mean" else per


def l1_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute logit difference per sample, ``mean_k |s_k − t_k|`` (DFAD, Fang et al. 2019).

    Shapes ``N×K`` → float32 ``N``; its mean is ``F.l1_loss(s, t)``.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
        raise KDGuardError(f"logit shapes {tuple(teacher_logits.shape)} and "
                           f"{tuple(student_logits.shape)} differ or are not N×K",
                           "pass teacher and student logits of the same batch")
    return (student_logits.float() - teacher_logits.float()).abs().mean(dim=1)


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, *,
                  temperature: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = ½(P+Q), averaged over the batch.

    Adaptive DeepInversion's competition term (Yin et al. 2020, Eq. 8) uses JS at τ = 3. The CMI
    code base's ``jsdiv`` clamps the probabilities to [0.01, 0.99] and swaps the KL arguments;
    kdguard computes the textbook JS (bounded by log 2). Shapes ``N×K`` → float32 scalar.
    """
    if p_logits.shape != q_logits.shape or p_logits.dim() != 2:
        raise KDGuardError(f"logit shapes {tuple(p_logits.shape)} and {tuple(q_logits.shape)} differ",
                           "pass two N×K logit tensors of the same batch")
    log_p = F.log_softmax(p_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def negative_masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """CMI's adversarial term ``−mean_i( KL(T_i‖S_i) · 1[argmax S_i = argmax T_i] )``.

    Fang et al. 2021 (Eq. 7, "decision adversarial distillation"): push the generator towards
    samples where the student still agrees with the teacher but diverges in distribution. The
    mask carries no gradient; masked-out samples count as zeros in the mean (as in the code).
    """
    per = kl_per_sample(teacher_logits, student_logits, reduction="batchmean")
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(per * agree).mean()


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss ``−mean |f|`` over the teacher's penultimate features (Chen et al.
    2019, Eq. 3). ``features``: ``N×D`` (or any shape) → float32 scalar."""
    return -features.float().abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy loss ``Σ_k p̄_k log p̄_k`` with ``p̄`` the batch-mean softmax.

    Minimising it maximises the entropy of the predicted class distribution (balanced classes;
    Chen et al. 2019, Eq. 4). Natural log as in the CMI code (``--balance``); DAFL's own code
    uses log10, i.e. this value × 1/ln 10. ``N×K`` → float32 scalar in ``[−log K, 0]``.
    """
    p = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return (p * torch.log(p.clamp_min(1e-12))).sum()


def total_variation(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """DeepInversion's image prior over the four neighbour differences (right, down, 2 diagonals).

    ``"l2"``: sum of the four Frobenius norms (NVIDIA ``get_image_prior_losses`` ``loss_var_l2``,
    CMI ``--tv``); ``"l1"``: sum of the four mean absolute differences. ``x``: ``N×C×H×W`` →
    float32 scalar.
    """
    x = x.float()
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    if kind == "l2":
        return sum(torch.linalg.vector_norm(d) for d in diffs)  # type: ignore[return-value]
    if kind == "l1":
        return sum(d.abs().mean() for d in diffs)  # type: ignore[return-value]
    raise KDGuardError(f"total-variation kind {kind!r} is not l2 or l1", "use l2 (DeepInversion) or l1")


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, *, temperature: float,
             n_current: int | None = None) -> torch.Tensor:
    """CMI's contrastive loss between two views (Fang et al. 2021, Eq. 5–6; ABD/CMI code).

    ``logits = anchors · positivesᵀ / τ`` (rows already L2-normalised, ``M×D``), cross-entropy
    with the diagonal as the positive; the positives are detached (the reference optimises only
    the local-view side). When ``n_current`` is given and smaller than ``M`` (rows beyond it come
    from the memory bank), the loss is ``mean(first n_current) + mean(rest)``, which keeps the
    current batch's gradient from being diluted by the bank (as in the reference).

    Returns:
        Float32 scalar ≥ 0.
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise KDGuardError(f"contrastive views have shapes {tuple(anchors.shape)} and "
                           f"{tuple(positives.shape)}", "pass two M×D projections")
    logits = anchors.float() @ positives.float().detach().T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    per = F.cross_entropy(logits, labels, reduction="none")
    if n_current is not None and 0 < n_current < len(per):
        return per[:n_current].mean() + per[n_current:].mean()
    return per.mean()
