"""Typed configuration of a data-free distillation run (OmegaConf structured dataclasses).

A :class:`DataFreeJob` is built in four layers, later ones winning::

    dataclass defaults  ←  preset (method × scale: ``kdguard/configs/datafree/<method>.yaml``)
                        ←  YAML file  ←  ``key=value`` overrides

so ``kdguard distill-datafree teacher=runs/t method=cmi preset=cpu cmi.adv=0`` starts from the
CPU-scale CMI recipe and changes one weight. Every default carries the value of the method's
paper or reference code; the source is named in the comment, and where a paper and its code
disagree the comment says which one is followed (see also ``docs/datafree.md``).

Only the options section of the selected method (``zskt``, ``dfad``, ``dafl``, ``deepinv``,
``cmi`` or ``ood``) is read; the others are carried along unused, so one YAML file can hold the
settings of several methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import AttackConfig, OptimConfig, TeacherSpec, require_complete, user_layer
from ..errors import KDGuardError, check_choice, check_positive
from ..presets import load_table

#: The data-free methods (the CLI's ``method=``), in the order of the issue.
METHOD_NAMES = ("zskt", "dfad", "dafl", "deepinv", "cmi", "ood")

#: The preset scales (``preset=``): the reference recipes, budgets for 2 CPU cores, or none.
PRESET_SCALES = ("cpu", "paper", "none")


def datafree_optim(**values: Any) -> OptimConfig:
    """An :class:`~kdguard.config.OptimConfig` with the data-free defaults: Adam, no weight decay.

    Its ``schedule`` is evaluated per round at progress ``round / rounds`` (the references step
    their schedulers once per pseudo-batch (ZSKT) or per epoch (CMI), i.e. once per round here).
    """
    return OptimConfig(**{"name": "adam", "lr": 2e-3, "weight_decay": 0.0, **values})


@dataclass
class ScheduleConfig:
    """How a run alternates synthesis and distillation (see ``docs/datafree.md``).

    One *round* = one ``synthesizer.synthesize()`` (``generator_steps`` optimisation steps of the
    generator or of the inputs) followed by ``student_steps`` student updates, each on
    ``synthesizer.sample(batch_size)``. The budget is ``rounds`` synthetic batches.
    """

    rounds: int = 1500                     # ZSKT: pseudo-batches (8e4 in the paper); CMI: epochs
    generator_steps: int = 1               # ZSKT n_generator_iter = 1; CMI/DeepInv g_steps
    student_steps: Optional[int] = 10      # ZSKT n_student_iter = 10; CMI kd_steps; null = one
                                           # pass over the image pool (OOD epochs)
    batch_size: int = 128                  # student batch (ZSKT 128, CMI 128, OOD 512)
    synthesis_batch_size: Optional[int] = None  # generator / inversion batch; null = batch_size
    stop_after: Optional[int] = None       # stop (checkpointed) once this many rounds are done;
                                           # the same command with a larger value or null resumes


@dataclass
class GeneratorConfig:
    """The image generator of the generator-based methods (ZSKT, DFAD, DAFL, CMI)."""

    kind: str = "zskt"                     # zskt (Micaelli & Storkey 2019) | dcgan (CMI/Fast-Datafree)
    latent_dim: Optional[int] = None       # null = the kind's reference value (zskt 100, dcgan 256)
    width: int = 64                        # ngf: channels 2w → 2w → w → C (both references: 64)
    output: str = "auto"                   # auto | sigmoid | affine | affine_clamp (auto: zskt →
                                           # affine, i.e. BN output read as a normalised image;
                                           # dcgan → sigmoid)


@dataclass
class ZSKTOptions:
    """ZSKT (Micaelli & Storkey, NeurIPS 2019), as run by ABD's ``zskt/solver.py``."""

    kl_temperature: float = 1.0            # --KL_temperature (ABD GTSRB sweeps: 0.5)
    kl_reduction: str = "mean"             # F.kl_div(reduction='mean') = batchmean / K, both losses
    at_beta: float = 250.0                 # --AT_beta; 0 disables attention transfer
    at_variant: str = "zagoruyko"          # normalize(mean_c A²), mean squared difference
    student_mode: str = "train"            # student BN mode in the generator step (reference: train)


@dataclass
class DFADOptions:
    """DFAD (Fang et al. 2019): adversarial mean absolute error on the logits."""

    student_mode: str = "train"            # reference DFAD keeps student.train() throughout
    sample: str = "fresh"                  # fresh z for every student step (reference)


@dataclass
class DAFLOptions:
    """DAFL (Chen et al., ICCV 2019), weights of the CMI code base (scripts/dafl_cifar10.sh)."""

    one_hot: float = 1.0                   # --oh (CMI); DAFL's own CIFAR run: 0.05
    activation: float = 0.1                # --act (CMI dafl_cifar10.sh; README runs 0.001)
    information_entropy: float = 20.0      # --balance (CMI; natural log); DAFL's --ie uses log10
    kd_temperature: float = 1.0            # CMI code: KLDiv() at T=1 for the generative methods
    sample: str = "fresh"                  # fresh (CMI GenerativeSynthesizer) | last (DAFL: the
                                           # batch the generator just produced)


@dataclass
class DeepInvOptions:
    """DeepInversion (Yin et al., CVPR 2020), CMI code base ``deepinv_cifar10.sh`` weights."""

    bn: float = 10.0                       # feature-statistics (BN) matching
    one_hot: float = 1.0                   # CE to sampled labels
    adv: float = 1.0                       # Adaptive DeepInversion competition (0 = plain DI)
    adv_temperature: float = 3.0           # JS temperature of the competition term (NVIDIA/CMI)
    tv: float = 1e-3                       # total variation (L2 form, normalised space)
    l2: float = 0.0                        # ‖x‖₂ prior (normalised space)
    jitter: float = 0.125                  # random roll up to this fraction of H, W (NVIDIA: 1/8)
    flip: bool = True                      # random horizontal flip of the batch during inversion
    kd_temperature: float = 20.0           # --T 20, τ²·KL batchmean


@dataclass
class CMIOptions:
    """CMI (Fang et al., IJCAI 2021), weights of ABD's ``cmi/sweeps/cmi_cifar10_poi.yml``."""

    bn: float = 1.0
    one_hot: float = 1.0
    adv: float = 0.5                       # masked KL adversarial term
    cr: float = 0.8                        # contrastive weight
    cr_temperature: float = 0.1            # --cr_T (ABD sweep 0.1; CMI script 0.2)
    bank_size: int = 40960                 # memory bank entries (local+global feature pairs)
    negatives: int = 4096                  # cached negatives drawn per step (n_neg)
    head_dim: int = 256                    # projection head output (datafree_kd.py passes 256)
    local_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # local-view crop area
    reinit_generator: bool = True          # re-initialise generator (and z) every round
    kd_temperature: float = 20.0           # --T 20, τ²·KL batchmean


@dataclass
class OODOptions:
    """OOD proxy-data KD (ABD ``cmi/vanilla_kd_ood.py``, after Asano & Saeed's single image)."""

    source: str = "image"                  # image (patches of one image) | dataset
    image: Optional[str] = None            # image file; null = matplotlib's grace_hopper.jpg
    dataset: Optional[str] = None          # registered dataset for source=dataset
    root: Optional[str] = None             # data root of that dataset; null = data.root
    patches: int = 50000                   # Asano et al. make 50,000 patches
    initial_crop: float = 0.5              # random crop of this fraction of the short side first
    min_area: float = 0.002                # smallest patch area / crop area (their scale 500 → 1/500)
    rotation: float = 30.0                 # max rotation, degrees
    shear: float = 30.0                    # max shear, degrees
    color_jitter: float = 0.5              # probability of brightness/contrast/saturation jitter
    cutmix_beta: float = 0.25              # --beta
    cutmix_prob: float = 1.0               # --cutmix_prob
    temperature: float = 8.0               # --temp
    kl_reduction: str = "mean"             # KDLoss(..., reduction='none') then torch.mean: /K, no τ²


@dataclass
class MonitorConfig:
    """Evaluation, image grids and checkpoints during a run (all in rounds)."""

    every: int = 100                       # CA/ASR/RA on the test split → metrics.jsonl; 0 = end only
    grid_every: int = 500                  # PNG grid of synthetic images; 0 = end only
    checkpoint_every: int = 50             # datafree_state.pt (also written at every evaluation)
    grid_size: int = 64                    # images per grid
    eval_batch_size: int = 512
    collapse_share: float = 0.9            # warn when one class takes more of the teacher's answers
                                           # on an interval's synthetic images; 1 = never


@dataclass
class DataFreeData:
    """Where the real *test* split comes from (only for measuring CA/ASR; never for training)."""

    name: Optional[str] = None             # null = the dataset in the teacher's manifest
    root: Optional[str] = None             # data root; else $KDGUARD_DATA_ROOT


@dataclass
class DataFreeJob:
    """A data-free distillation run: teacher checkpoint → student, no training data."""

    teacher: str = MISSING                 # checkpoint directory (kdguard run) or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    method: str = "zskt"                   # zskt | dfad | dafl | deepinv | cmi | ood
    preset: str = "cpu"                    # cpu | paper | none (configs/datafree/<method>.yaml)
    student: str = "resnet8"               # paper: wrn16_1 (ABD); cpu preset: resnet8
    data: DataFreeData = field(default_factory=DataFreeData)
    attack: Optional[AttackConfig] = None  # null = the attack recorded in the teacher's manifest
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    student_optim: OptimConfig = field(default_factory=datafree_optim)
    generator_optim: OptimConfig = field(default_factory=lambda: datafree_optim(lr=1e-3))
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    zskt: ZSKTOptions = field(default_factory=ZSKTOptions)
    dfad: DFADOptions = field(default_factory=DFADOptions)
    dafl: DAFLOptions = field(default_factory=DAFLOptions)
    deepinv: DeepInvOptions = field(default_factory=DeepInvOptions)
    cmi: CMIOptions = field(default_factory=CMIOptions)
    ood: OODOptions = field(default_factory=OODOptions)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    device: str = "auto"
    amp: str = "auto"                      # bf16 autocast: auto | on | off
    channels_last: str = "auto"            # auto | on | off
    progress: bool = True
    seed: int = 0
    out: str = "runs/datafree"


def preset_values(method: str, scale: str) -> dict[str, Any]:
    """The nested dict of job values that preset ``scale`` sets for ``method``.

    The recipes are the shipped files ``kdguard/configs/datafree/<method>.yaml``: the entry
    ``common`` (losses, weights and optimisers of the method's reference code) with the entry
    ``cpu`` (ResNet-8 student, budgets of at most about 40 minutes on 2 CPU cores) or ``paper``
    (the reference budgets, WRN-16-1 student) merged on top; each file names its sources.

    Args:
        method: one of :data:`METHOD_NAMES`.
        scale: ``"cpu"``, ``"paper"`` or ``"none"`` (returns ``{}``).

    Raises:
        KDGuardError: unknown method or scale.
    """
    if scale not in PRESET_SCALES:
        raise KDGuardError(f"preset {scale!r} is not one of {', '.join(PRESET_SCALES)}",
                           "use preset=cpu, preset=paper or preset=none")
    if method not in METHOD_NAMES:
        raise KDGuardError(f"data-free method {method!r} is not one of {', '.join(METHOD_NAMES)}",
                           f"set method= one of: {', '.join(METHOD_NAMES)}")
    if scale == "none":
        return {}
    table = load_table(f"datafree/{method}.yaml", DataFreeJob)
    merged = OmegaConf.merge(table["common"], table[scale])
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def _error_from_omegaconf(err: OmegaConfBaseException) -> KDGuardError:
    msg = str(err).splitlines()[0]
    return KDGuardError(f"invalid configuration: {msg}",
                        "check key names and value types against docs/datafree.md")


def _peek(cfg: Any, key: str, default: str) -> str:
    value = OmegaConf.select(cfg, key, default=None)
    return default if value is None else str(value)


def build_datafree_job(yaml_path: str | Path | None = None, overrides: list[str] | None = None, *,
                       schema: type[DataFreeJob] = DataFreeJob) -> DataFreeJob:
    """Merge defaults ← preset ← YAML ← ``key=value`` overrides into a typed :class:`DataFreeJob`.

    The preset is chosen by the final ``method`` and ``preset`` values (so both may come from
    the YAML file or the overrides). ``preset=none`` skips the preset layer. ``schema`` is
    :class:`DataFreeJob` or a subclass that adds sections (the CLI's job adds ABD's ``abd``,
    :class:`kdguard.jobs.datafree.DataFreeABDJob`).

    Raises:
        KDGuardError: missing YAML file, malformed override, unknown key, wrong type, unknown
            method or preset, or a missing required value (``teacher``).
    """
    try:
        user = user_layer(yaml_path, overrides, example="schedule.rounds=500")
        method = _peek(user, "method", schema.method)
        scale = _peek(user, "preset", schema.preset)
        cfg = OmegaConf.structured(schema)
        cfg = OmegaConf.merge(cfg, OmegaConf.create(preset_values(method, scale)), user)
        require_complete(cfg, "pass {key}=VALUE (or --{key}) or set it in the YAML file")
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error_from_omegaconf(e) from None
    validate_job(job)  # type: ignore[arg-type]
    return job  # type: ignore[return-value]


def validate_job(job: DataFreeJob) -> None:
    """Check a job's values (names, ranges) before anything heavy runs.

    Raises:
        KDGuardError: naming the first bad setting and the fix.
    """
    check_choice("method", job.method, METHOD_NAMES)
    check_choice("preset", job.preset, PRESET_SCALES)
    s = job.schedule
    for label, value in (("schedule.rounds", s.rounds), ("schedule.generator_steps", s.generator_steps),
                         ("schedule.batch_size", s.batch_size),
                         ("schedule.student_steps", s.student_steps),
                         ("schedule.synthesis_batch_size", s.synthesis_batch_size),
                         ("schedule.stop_after", s.stop_after)):
        check_positive(label, value)
    for prefix, opt in (("student_optim", job.student_optim), ("generator_optim", job.generator_optim)):
        check_choice(f"{prefix}.name", opt.name, ("adam", "sgd"))
        check_choice(f"{prefix}.schedule", opt.schedule, ("cosine", "multistep", "constant"))
        check_positive(f"{prefix}.lr", opt.lr)
        check_positive(f"{prefix}.grad_clip", opt.grad_clip)
        if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
            raise KDGuardError(f"{prefix}.betas {list(opt.betas)!r} is not two values in [0, 1)",
                               "give e.g. [0.9, 0.999]")
        if opt.warmup_epochs:
            raise KDGuardError(f"{prefix}.warmup_epochs {opt.warmup_epochs!r}: a data-free run has rounds, "
                               "not epochs, and no warm-up", f"leave {prefix}.warmup_epochs at 0")
    check_choice("generator.kind", job.generator.kind, ("zskt", "dcgan"))
    check_choice("generator.output", job.generator.output, ("auto", "sigmoid", "affine", "affine_clamp"))
    check_positive("generator.latent_dim", job.generator.latent_dim)
    check_positive("generator.width", job.generator.width)
    check_choice("zskt.kl_reduction", job.zskt.kl_reduction, ("mean", "batchmean"))
    check_choice("ood.kl_reduction", job.ood.kl_reduction, ("mean", "batchmean"))
    for label, mode in (("zskt.student_mode", job.zskt.student_mode),
                        ("dfad.student_mode", job.dfad.student_mode)):
        check_choice(label, mode, ("train", "eval"))
    for label, mode in (("dfad.sample", job.dfad.sample), ("dafl.sample", job.dafl.sample)):
        check_choice(label, mode, ("fresh", "last"))
    check_choice("ood.source", job.ood.source, ("image", "dataset"))
    m = job.monitor
    for label, value in (("monitor.every", m.every), ("monitor.grid_every", m.grid_every),
                         ("monitor.checkpoint_every", m.checkpoint_every)):
        check_positive(label, value, allow_zero=True)
    check_positive("monitor.grid_size", m.grid_size)
    check_positive("monitor.eval_batch_size", m.eval_batch_size)
    if not 0.0 < m.collapse_share <= 1.0:
        raise KDGuardError(f"monitor.collapse_share={m.collapse_share} is outside (0, 1]",
                           "give a share such as 0.9 (1 disables the collapse warning)")
