"""The data-free methods by name: each builds its synthesizer and the student's loss from a job.

============  ===================================  ============================================
method        synthesizer                          student loss
============  ===================================  ============================================
``zskt``      adversarial generator, −KL           KL(T‖S) ÷K (``mean``) + 250·Σ AT, τ = 1
``dfad``      adversarial generator, −MAE          MAE of logits
``dafl``      generator: one-hot + act. + entropy  KL(T‖S), τ = 1, batchmean
``deepinv``   pixel inversion → pool               τ²·KL, τ = 20, batchmean
``cmi``       re-initialised generator → pool      τ²·KL, τ = 20, batchmean
``ood``       proxy images (+ CutMix)              KL(T‖S) ÷K (``mean``), τ = 8
============  ===================================  ============================================

:data:`DATAFREE_METHODS` maps each name to a builder ``(job, ctx) -> MethodParts``; a new
method registers one more builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import load_dataset
from ..augment import Augment, fit_images, single_image_patches
from ..errors import KDGuardError
from ..models.stages import stage_paths
from ..registry import Registry
from .config import DataFreeJob
from .generators import build_generator
from .student import DistillObjective
from .synthesizers import (CMISynthesizer, DAFLGeneratorLoss, DeepInversionSynthesizer,
                           DFADGeneratorLoss, GeneratorSynthesizer, ProxySynthesizer, Synthesizer,
                           ZSKTGeneratorLoss, default_proxy_image, read_image)


@dataclass
class MethodContext:
    """What a method builder needs besides the job.

    Attributes:
        teacher, student: models on ``device`` (teacher frozen, eval mode).
        image_shape: ``(C, H, W)``; num_classes: K.
        mean, std: the teacher's input normalisation (0–1 scale, per channel).
        hflip: whether flips preserve labels on the real data (crop/flip augmentation of pools).
        device, bf16, seed: run settings.
        data_root: the job's data root (for proxy data sets).
    """

    teacher: nn.Module
    student: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    device: torch.device
    bf16: bool = False
    seed: int = 0
    data_root: str | None = None

    def synth_kwargs(self) -> dict[str, Any]:
        return dict(image_shape=self.image_shape, num_classes=self.num_classes, device=self.device,
                    seed=self.seed + 1, bf16=self.bf16)


@dataclass
class MethodParts:
    """A method, assembled: its synthesizer, the student's loss and the student steps per round."""

    synthesizer: Synthesizer
    objective: DistillObjective
    student_steps: int


MethodBuilder = Callable[[DataFreeJob, MethodContext], MethodParts]
DATAFREE_METHODS: Registry[MethodBuilder] = Registry("data-free method")


def input_statistics(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own input normalisation (its ``normalize.mean/std`` buffers) if it has one,
    else the given dataset statistics."""
    norm = getattr(model, "normalize", None)
    if norm is not None and hasattr(norm, "mean") and hasattr(norm, "std"):
        return (tuple(float(v) for v in norm.mean.flatten().tolist()),
                tuple(float(v) for v in norm.std.flatten().tolist()))
    return tuple(mean), tuple(std)


def _synthesis_batch(job: DataFreeJob) -> int:
    return job.schedule.synthesis_batch_size or job.schedule.batch_size


def _student_steps(job: DataFreeJob, what: str) -> int:
    if job.schedule.student_steps is None:
        raise KDGuardError(f"schedule.student_steps is null, which only the ood method supports ({what})",
                           "give schedule.student_steps a number")
    return int(job.schedule.student_steps)


def _generator(job: DataFreeJob, ctx: MethodContext):
    g = job.generator
    return build_generator(g.kind, ctx.image_shape, latent_dim=g.latent_dim, width=g.width,
                           output=g.output, mean=ctx.mean, std=ctx.std).to(ctx.device)


def _pool_augment(ctx: MethodContext) -> Augment:
    return Augment(4, hflip=ctx.hflip)


def _paths_or_off(model: nn.Module, kind: str, off: str) -> list[str]:
    """:func:`stage_paths`, whose error also names the setting that turns the feature term off."""
    try:
        return list(stage_paths(model, kind))
    except KDGuardError as e:
        raise KDGuardError(e.problem, f"{e.fix}, or set {off} to run without this feature term"
                           if e.fix else f"set {off} to run without this feature term") from None


@DATAFREE_METHODS.register("zskt", description="Zero-Shot Knowledge Transfer (Micaelli & Storkey 2019)")
def build_zskt(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """ZSKT: adversarial generator (−KL), student KL + β·attention transfer on matching stages.

    Raises:
        KDGuardError: attention transfer on teacher and student with different stage counts,
            or a synthesis batch different from the student batch.
    """
    o = job.zskt
    if _synthesis_batch(job) != job.schedule.batch_size:
        raise KDGuardError("ZSKT trains the student on the generator's batch, so "
                           "schedule.synthesis_batch_size must equal schedule.batch_size",
                           "leave schedule.synthesis_batch_size null")
    t_paths = _paths_or_off(ctx.teacher, "stages", "zskt.at_beta=0") if o.at_beta > 0 else []
    s_paths = _paths_or_off(ctx.student, "stages", "zskt.at_beta=0") if o.at_beta > 0 else []
    objective = DistillObjective("kl", o.kl_temperature, o.kl_reduction, t2_scale=False,
                                 at_beta=o.at_beta, at_variant=o.at_variant,
                                 teacher_paths=t_paths, student_paths=s_paths)
    synth = GeneratorSynthesizer(
        ctx.teacher, ctx.student, _generator(job, ctx),
        ZSKTGeneratorLoss(temperature=o.kl_temperature, reduction=o.kl_reduction),
        optim=job.generator_optim, batch_size=job.schedule.batch_size,
        steps=job.schedule.generator_steps, student_mode=o.student_mode, z_per="round",
        sample_mode="last", **ctx.synth_kwargs())
    return MethodParts(synth, objective, _student_steps(job, "zskt"))


@DATAFREE_METHODS.register("dfad", description="Data-Free Adversarial Distillation (Fang et al. 2019)")
def build_dfad(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """DFAD: adversarial generator maximising the logit MAE, student minimising it."""
    o = job.dfad
    synth = GeneratorSynthesizer(
        ctx.teacher, ctx.student, _generator(job, ctx), DFADGeneratorLoss(),
        optim=job.generator_optim, batch_size=_synthesis_batch(job),
        steps=job.schedule.generator_steps, student_mode=o.student_mode, z_per="step",
        sample_mode=o.sample, **ctx.synth_kwargs())
    return MethodParts(synth, DistillObjective("l1"), _student_steps(job, "dfad"))


@DATAFREE_METHODS.register("dafl", description="Data-Free Learning of student networks (Chen et al. 2019)")
def build_dafl(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """DAFL: generator trained on the teacher alone (one-hot, activation, information entropy)."""
    o = job.dafl
    paths = _paths_or_off(ctx.teacher, "penultimate", "dafl.activation=0") if o.activation else []
    loss = DAFLGeneratorLoss(one_hot=o.one_hot, activation=o.activation,
                             information_entropy=o.information_entropy, feature_paths=paths)
    synth = GeneratorSynthesizer(
        ctx.teacher, ctx.student, _generator(job, ctx), loss, optim=job.generator_optim,
        batch_size=_synthesis_batch(job), steps=job.schedule.generator_steps, student_mode="eval",
        z_per="step", sample_mode=o.sample, **ctx.synth_kwargs())
    objective = DistillObjective("kl", o.kd_temperature, "batchmean", t2_scale=True)
    return MethodParts(synth, objective, _student_steps(job, "dafl"))


@DATAFREE_METHODS.register("deepinv", description="DeepInversion / Adaptive DeepInversion (Yin et al. 2020)")
def build_deepinv(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """DeepInversion: pixel optimisation with BN-statistics matching, pool, τ²·KL at τ = 20."""
    o = job.deepinv
    synth = DeepInversionSynthesizer(
        ctx.teacher, ctx.student, options=o, optim=job.generator_optim,
        batch_size=_synthesis_batch(job), steps=job.schedule.generator_steps, mean=ctx.mean,
        std=ctx.std, augment=_pool_augment(ctx), **ctx.synth_kwargs())
    objective = DistillObjective("kl", o.kd_temperature, "batchmean", t2_scale=True)
    return MethodParts(synth, objective, _student_steps(job, "deepinv"))


@DATAFREE_METHODS.register("cmi", description="Contrastive Model Inversion (Fang et al. 2021)")
def build_cmi(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """CMI: re-initialised generator per round with BN, one-hot, adversarial and contrastive
    losses; growing pool; τ²·KL at τ = 20."""
    o = job.cmi
    synth = CMISynthesizer(
        ctx.teacher, ctx.student, _generator(job, ctx), options=o, optim=job.generator_optim,
        batch_size=_synthesis_batch(job), steps=job.schedule.generator_steps,
        augment=_pool_augment(ctx), **ctx.synth_kwargs())
    objective = DistillObjective("kl", o.kd_temperature, "batchmean", t2_scale=True)
    return MethodParts(synth, objective, _student_steps(job, "cmi"))


def proxy_images(job: DataFreeJob, ctx: MethodContext) -> torch.Tensor:
    """The OOD pool: patches of one image, or another data set fitted to the teacher's input.

    Returns ``uint8`` ``N×C×H×W``. Patch generation is seeded by ``job.seed``, so a resumed run
    rebuilds the identical pool.

    Raises:
        KDGuardError: missing image/data set, or ``source=dataset`` without ``ood.dataset``.
    """
    o = job.ood
    c, h, w = ctx.image_shape
    if o.source == "dataset":
        if not o.dataset:
            raise KDGuardError("ood.source=dataset needs ood.dataset", "set ood.dataset=NAME (e.g. gtsrb)")
        proxy = load_dataset(o.dataset, "train", root=o.root or ctx.data_root)
        return fit_images(proxy.images, ctx.image_shape)
    path = o.image or default_proxy_image()
    image = read_image(path, channels=c)
    rng = torch.Generator(device=ctx.device).manual_seed(job.seed + 7919)
    return single_image_patches(image, o.patches, (h, w), generator=rng, initial_crop=o.initial_crop,
                                min_area=o.min_area, rotation=o.rotation, shear=o.shear,
                                color_prob=o.color_jitter)


@DATAFREE_METHODS.register("ood", description="OOD proxy-data KD (ABD; Asano & Saeed 2023)")
def build_ood(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """OOD KD: logit KD (τ = 8, ``mean`` reduction) on proxy images with flip, crop and CutMix."""
    o = job.ood
    images = proxy_images(job, ctx)
    synth = ProxySynthesizer(ctx.teacher, ctx.student, images, cutmix_beta=o.cutmix_beta,
                             cutmix_prob=o.cutmix_prob, augment=Augment(4, hflip=True),
                             **ctx.synth_kwargs())
    steps = job.schedule.student_steps or max(1, len(images) // job.schedule.batch_size)
    objective = DistillObjective("kl", o.temperature, o.kl_reduction, t2_scale=False)
    return MethodParts(synth, objective, int(steps))


def build_method(job: DataFreeJob, ctx: MethodContext) -> MethodParts:
    """Assemble ``job.method`` (see :data:`DATAFREE_METHODS`).

    Raises:
        KDGuardError: unknown method, or any problem of the method's builder.
    """
    return DATAFREE_METHODS.get(job.method)(job, ctx)
