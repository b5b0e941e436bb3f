"""The distillation defence for poisoned encoders (Han et al., arXiv 2403.03846, 2024) and its components.

The defender holds the poisoned encoder and a small clean unlabelled subset (5 % of the
pre-training set). A student encoder is trained on that subset with (paper 1's ``distillation.py``)

    L = L_SimCLR(student; x₁, x₂, τ) + Σ_l w_l · L_d(S_l(x₁), T_l(x₁)) + w₅ · (−cos(f_T(x₁), f_S(x₁)))

where ``x₁, x₂`` are two SimCLR views of a clean image, ``S_l``/``T_l`` the outputs of the encoders'
stages (ResNet ``layer1..4``; the CIFAR ResNets have 3) and ``f`` the pooled features. The teacher
is frozen (eval mode). The study compares three components:

**Teachers** (:data:`TEACHERS`)

* ``poisoned``: the poisoned encoder itself.
* ``finetuned``: the poisoned encoder fine-tuned with SimCLR on the clean subset (NAD's teacher
  recipe, Li et al. ICLR 2021, moved to self-supervision); paper 1's best teacher.
* ``nad``: NAD applied to the encoder: the poisoned encoder trained with SimCLR plus NAD's attention
  distillation ``Σ_l β_l·AT(S_l, T_l)`` from the fine-tuned teacher (β = 500, then 1000 per deeper
  stage; NAD's ``nad`` attention map), i.e. "fine-tuned, then attention-distilled".
* ``fine_pruning``: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018) for an encoder: the
  ``prune_ratio`` channels of the last stage with the lowest mean activation on the clean subset
  are switched off (the encoder's channel mask), then the encoder is fine-tuned with SimCLR. The
  original prunes until the clean accuracy drops; an encoder has no labels, so the ratio is fixed.

``kdguard.defenses`` holds the supervised versions of fine-tuning, fine-pruning and NAD (labelled
data, cross-entropy, accuracy-based stopping); they do not apply to unlabelled encoders, so the
self-supervised counterparts live here.

**Students** (:data:`STUDENTS`): ``random`` (fresh initialisation of the teacher's architecture),
``warmup`` (random, then SimCLR on the clean subset; paper 1's best) and ``poisoned`` (a copy of
the poisoned encoder).

**Losses** (:data:`kdguard.ssl.stage_losses.LOSSES`), per stage pair, in their standard forms (each
has the paper-1-code variant as an option): ``at`` attention transfer, ``afd`` attention-based
feature distillation, ``fitnet`` hints, ``cc`` correlation congruence, ``kd`` feature-level KD
(τ²·KL of the channel softmax, paper 1's ``KD`` mode) and ``sp`` similarity preserving.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..errors import KDGuardError, check_range, unknown_name
from ..runtime import autocast, eval_mode, resolve_device, use_bf16
from ..taps import FeatureTaps
from .cache import cached_model
from .config import DefenseConfig
from .encoder import SSLModel, build_from_spec, clone_model
from .loop import EpochLog, SSLLoop
from .simclr import nt_xent, train_simclr
from .stage_losses import LOSSES, StageLoss, default_stage_weights

TEACHERS: dict[str, str] = {
    "poisoned": "the poisoned encoder as published",
    "finetuned": "the poisoned encoder fine-tuned with SimCLR on the clean subset",
    "nad": "NAD: the poisoned encoder trained with SimCLR + attention distillation from the fine-tuned one",
    "fine_pruning": "fine-pruning: least-active last-stage channels switched off, then SimCLR fine-tuning",
}

STUDENTS: dict[str, str] = {
    "random": "fresh random initialisation of the teacher's architecture",
    "warmup": "random initialisation, then SimCLR on the clean subset",
    "poisoned": "a copy of the poisoned encoder",
}


class EncoderDistiller(nn.Module):
    """Student SSL model + stage loss; the teacher is held outside the module (frozen, never saved).

    ``losses(x1, x2)`` (two float views ``N×C×H×W`` in [0, 1]) returns ``{"simclr": NT-Xent of the
    student, "distill": Σ_l w_l L(S_l(x1), T_l(x1)), "output": w₅·(−mean cos(f_T(x1), f_S(x1)))}``
    (the last two only when their weights are non-zero). The teacher runs under ``no_grad``.

    Raises:
        KDGuardError: see :class:`StageLoss`; ``student is teacher``.
    """

    def __init__(self, student: SSLModel, teacher: SSLModel, loss: str, *, stage_weights: Sequence[float] | None,
                 output_weight: float = 0.0, temperature: float = 0.5,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if student is teacher:
            raise KDGuardError("the student and the teacher are the same object", "pass a copy as the student")
        if output_weight < 0:
            raise KDGuardError(f"output weight {output_weight!r} is negative", "give w5 >= 0")
        self.student = student
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, not optimised, not checkpointed
        weights = (list(stage_weights) if stage_weights is not None
                   else default_stage_weights(loss, teacher.encoder.num_stages))
        opts = dict(options or {})
        if LOSSES.get(loss).name == "sp" and opts.get("variant") == "output":
            if output_weight == 0:  # that variant is nothing but the output term
                raise KDGuardError("sp variant 'output' (paper 1's SP mode) uses only the output-feature "
                                   "cosine term, whose weight is 0", "set defense.output_weight=1")
            if stage_weights is None:
                weights = [0.0] * teacher.encoder.num_stages
        self.stage_loss = StageLoss(loss, student.encoder.stage_shapes, teacher.encoder.stage_shapes,
                                    weights, opts)
        self.output_weight = float(output_weight)
        self.temperature = float(temperature)
        self.arch = student.arch
        self._s_taps = FeatureTaps(student.encoder, student.encoder.stage_paths)
        self._t_taps = FeatureTaps(teacher.encoder, teacher.encoder.stage_paths, detach=True)

    def remove_hooks(self) -> None:
        self._s_taps.remove()
        self._t_taps.remove()

    def losses(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        use_stages = self.stage_loss.active
        if use_stages:
            h1, s_maps = self._s_taps(x1)
        else:
            h1 = self.student.encoder(x1)
        h2 = self.student.encoder(x2)
        out = {"simclr": nt_xent(self.student.head(h1), self.student.head(h2), self.temperature)}
        if not use_stages and self.output_weight == 0:
            return out
        with torch.no_grad():
            if use_stages:
                t_h, t_maps = self._t_taps(x1)
            else:
                t_h = self.teacher.encoder(x1)
        if use_stages:
            out["distill"] = self.stage_loss(list(s_maps.values()), list(t_maps.values()))
        if self.output_weight > 0:
            cos = (F.normalize(t_h.float(), dim=1) * F.normalize(h1.float(), dim=1)).sum(1)
            out["output"] = self.output_weight * (-cos.mean())
        return out


def distill_encoder(student: SSLModel, teacher: SSLModel, images: torch.Tensor, loss: str,
                    cfg: DefenseConfig, *, train: TrainConfig | None = None,
                    stage_weights: Sequence[float] | None = None, output_weight: float | None = None,
                    options: dict[str, Any] | None = None, run_dir: str | Path | None = None,
                    seed: int = 0, desc: str = "distill") -> list[EpochLog]:
    """Train ``student`` (in place) on uint8 clean ``images`` with SimCLR + distillation from ``teacher``.

    Args:
        student, teacher: SSL models (the teacher is frozen in eval mode for the whole run).
        images: uint8 ``N×C×H×W`` clean subset at the encoders' input shape.
        loss: a :data:`LOSSES` name.
        cfg: defence settings (τ, default weights/options, augmentation, schedule ``cfg.train``).
        train, stage_weights, output_weight, options: override ``cfg``'s values (used for NAD).
        run_dir, seed, desc: see :class:`SSLLoop` (resumable).

    Returns:
        The per-epoch history (``simclr``, ``distill``, ``output`` terms).

    Raises:
        KDGuardError: see :class:`EncoderDistiller` and :class:`SSLLoop`.
    """
    distiller = EncoderDistiller(
        student, teacher, loss,
        stage_weights=cfg.stage_weights if stage_weights is None else stage_weights,
        output_weight=cfg.output_weight if output_weight is None else output_weight,
        temperature=cfg.temperature, options=cfg.loss_options if options is None else options)
    augment = cfg.augment.build()
    loop = SSLLoop(distiller, train or cfg.train, run_dir=run_dir, seed=seed, desc=desc, frozen=[teacher])

    def step(idx: torch.Tensor, lp: SSLLoop) -> dict[str, torch.Tensor]:
        x = images[idx].to(lp.device)
        return distiller.losses(lp.layout(augment(x, lp.generator)), lp.layout(augment(x, lp.generator)))

    try:
        return loop.fit(len(images), step)
    finally:
        distiller.remove_hooks()


# --- fine-pruning -----------------------------------------------------------------------------

@torch.no_grad()
def last_stage_activation(model: SSLModel, images: torch.Tensor, *, batch_size: int = 256,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean activation of each last-stage channel over uint8 ``images`` (eval mode): float ``C_last``."""
    device = resolve_device(str(device)) if isinstance(device, str) else device
    enc = model.encoder.to(device)
    total = torch.zeros(enc.stage_shapes[-1][0], dtype=torch.float64)
    with eval_mode(enc), FeatureTaps(enc, [enc.stage_paths[-1]], detach=True) as taps:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).float().div_(255.0)
            with autocast(device, use_bf16("auto", device, enc)):
                _, feats = taps(x)
            fmap = next(iter(feats.values())).float()
            total += fmap.mean(dim=(2, 3)).sum(0).double().cpu()
    return (total / max(len(images), 1)).float()


def prune_last_stage(model: SSLModel, images: torch.Tensor, ratio: float, *,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Switch off the ``round(ratio·C)`` least-active last-stage channels (Fine-Pruning, Liu et al. 2018).

    Activation = mean over the clean ``images`` and positions of the (masked) last-stage output.
    At least one channel is always kept. Returns the pruned channel indices (int64, sorted).

    Raises:
        KDGuardError: ``ratio`` outside [0, 1).
    """
    check_range("prune ratio", ratio, 0.0, 1.0, high_open=True)
    act = last_stage_activation(model, images, device=device)
    mask = model.encoder.channel_mask
    act = torch.where(mask.cpu() > 0, act, torch.full_like(act, float("-inf")))  # already pruned first
    count = min(int(round(ratio * len(act))), len(act) - 1)
    pruned = act.argsort()[:count].sort().values
    mask[pruned.to(mask.device)] = 0.0
    return pruned


# --- teachers and students --------------------------------------------------------------------

def prepare_teacher(kind: str, poisoned: SSLModel, images: torch.Tensor, cfg: DefenseConfig, *,
                    cache: str | Path, seed: int = 0, identity: dict[str, Any] | None = None) -> SSLModel:
    """Build (or load from ``cache/teacher_<kind>``) one of the four :data:`TEACHERS`.

    Args:
        kind: ``poisoned`` | ``finetuned`` | ``nad`` | ``fine_pruning``.
        poisoned: the poisoned SSL model (not modified).
        images: the clean subset, uint8 ``N×C×H×W``.
        cfg: ``finetune`` (schedule of fine-tuning, NAD and fine-pruning's fine-tuning),
            ``nad_betas``, ``prune_ratio``, ``augment``, ``temperature``.
        cache: folder for the prepared teachers.
        identity: what identifies the inputs (poisoned checkpoint, clean subset), recorded with
            the cached model so that a cache made from other inputs is refused.

    Returns:
        The teacher SSL model (a new object; ``poisoned`` is returned as a copy).

    Raises:
        KDGuardError: unknown kind, or errors of the training steps.
    """
    if kind not in TEACHERS:
        raise unknown_name("teacher", kind, TEACHERS)
    cache = Path(cache)
    if kind == "poisoned":
        return clone_model(poisoned)
    base = {"kind": kind, "seed": seed, "n_images": len(images), "finetune": cfg.finetune,
            "augment": cfg.augment, "temperature": cfg.temperature, "identity": identity}
    augment = cfg.augment.build()
    if kind == "finetuned":
        def build(d: Path) -> SSLModel:
            model = clone_model(poisoned)
            train_simclr(model, images, cfg.finetune, augment=augment, temperature=cfg.temperature,
                         run_dir=d, seed=seed, desc="teacher[finetuned]")
            return model
        return cached_model(cache / "teacher_finetuned", base, build, "teacher")
    if kind == "nad":
        attention_teacher = prepare_teacher("finetuned", poisoned, images, cfg, cache=cache, seed=seed,
                                            identity=identity)
        n = poisoned.encoder.num_stages
        betas = list(cfg.nad_betas) or [500.0] + [1000.0] * (n - 1)  # NAD README: β = 500, 1000, 1000

        def build(d: Path) -> SSLModel:
            model = clone_model(poisoned)
            distill_encoder(model, attention_teacher, images, "at", cfg, train=cfg.finetune,
                            stage_weights=betas, output_weight=0.0, options={"variant": "nad", "p": 2.0},
                            run_dir=d, seed=seed, desc="teacher[nad]")
            return model
        return cached_model(cache / "teacher_nad", {**base, "betas": betas}, build, "teacher")

    def build(d: Path) -> SSLModel:  # fine_pruning
        model = clone_model(poisoned)
        device = resolve_device(cfg.finetune.device, setting="defense.finetune.device")
        pruned = prune_last_stage(model, images, cfg.prune_ratio, device=device)
        (d / "pruned_channels.json").write_text(json.dumps(pruned.tolist()))
        train_simclr(model, images, cfg.finetune, augment=augment, temperature=cfg.temperature,
                     run_dir=d, seed=seed, desc="teacher[fine_pruning]")
        return model
    return cached_model(cache / "teacher_fine_pruning", {**base, "prune_ratio": cfg.prune_ratio}, build, "teacher")


def prepare_student(kind: str, poisoned: SSLModel, images: torch.Tensor, cfg: DefenseConfig, *,
                    cache: str | Path, seed: int = 0, identity: dict[str, Any] | None = None) -> SSLModel:
    """Build (or load) one of the three :data:`STUDENTS`, with the poisoned encoder's architecture.

    ``random`` is seeded with ``seed``; ``warmup`` trains that initialisation with SimCLR on
    ``images`` under ``cfg.warmup`` (cached in ``cache/student_warmup``); ``poisoned`` copies the
    poisoned model (its head included). ``identity``: see :func:`prepare_teacher`.

    Raises:
        KDGuardError: unknown kind, or errors of the warm-up training.
    """
    if kind not in STUDENTS:
        raise unknown_name("student", kind, STUDENTS)
    if kind == "poisoned":
        return clone_model(poisoned)
    spec = poisoned.spec()
    if kind == "random":
        return build_from_spec(spec, seed=seed)

    def build(d: Path) -> SSLModel:
        model = build_from_spec(spec, seed=seed)
        train_simclr(model, images, cfg.warmup, augment=cfg.augment.build(), temperature=cfg.temperature,
                     run_dir=d, seed=seed, desc="student[warmup]")
        return model
    settings = {"kind": kind, "seed": seed, "n_images": len(images), "warmup": cfg.warmup,
                "augment": cfg.augment, "temperature": cfg.temperature, "spec": spec, "identity": identity}
    return cached_model(Path(cache) / "student_warmup", settings, build, "student")

