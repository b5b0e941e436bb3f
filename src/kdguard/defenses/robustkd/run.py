"""The RobustKD job: detoxify a teacher's features on clean data, then distil a student from it.

``run_robustkd(job)`` writes one run directory (like :func:`kdguard.pipeline.distill`)::

    config.yaml           the resolved RobustKDJob
    detox.safetensors     the masks' logits Z and replacements P per stage (FeatureDetox.save)
    detox_masks.png       mask value per stage and channel, with the clean variance overlaid
    detox_history.json    per-epoch detox losses, clean accuracy, agreement, masked fraction
    detox_metrics.json    CA/ASR of the detoxified teacher on the test split, and the wall time
    detox_perturbation.safetensors   the final δ (adversarial term on)
    detox_perturbation_search.json   mean KL per δ* search pass (adversarial_against=teacher)
    model.safetensors + manifest.json   the student; metrics.json (its CA/ASR and the timings)
    train_state.pt, metrics.jsonl, report.md, curves.png, trigger_preview.png

A run restarted on the same directory reuses ``detox.safetensors`` and resumes the student's
training from ``train_state.pt``. The test split is used only for the final metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING
from safetensors.torch import save_file
from torch import nn

from ...checkpoint import load_teacher, model_spec, save_model
from ...config import AttackConfig, DataConfig, TeacherSpec, TrainConfig, to_dict
from ...data import ImageDataset
from ...errors import KDGuardError, check_range
from ...io import atomic_write, read_json, write_json
from ...models import build_model
from ...models.stages import stage_paths
from ...pipeline import (RunResult, attack_from_manifest, attack_record, clean_subset, evaluate_model,
                         load_splits, make_attack, make_augment, prepare_run, val_evaluator)
from ...runtime import resolve_device, use_bf16
from ...train import Trainer
from .detox import DETOX_FILE, FeatureDetox
from .distill import RobustKDDistiller
from .objective import DetoxObjective
from .optimize import DetoxResult, detoxify
from .plots import plot_masks, plot_trigger
from .presets import get_pair
from .trigger_opt import RobustKDBlend, optimize_blend_trigger

DEFAULT_DATASET = DataConfig().name


@dataclass
class DetoxConfig:
    """How the teacher is detoxified (see ``objective.py`` for the equations)."""

    enabled: bool = True                   # false: no detoxification (plain OFD / KD baseline)
    load: Optional[str] = None             # reuse a saved detox.safetensors (or its run directory)
    paths: Optional[list[str]] = None      # null = the teacher's pre_relu stage preset
    granularity: str = "element"           # element (C×H×W, reference tensors) | channel (C×1×1)
    combine: str = "replace"               # replace: (1−M)F + MP (reference WRN) | additive: F + MP
    init_mask: float = 0.05
    activation: str = "relu"               # a(·) of the clean variance statistics
    form: str = "dormant"                  # dormant (kdguard default) | variance (literal reading)
    ce_weight: float = 1.0                 # w_ce: CE of the detoxified teacher to clean labels
    kd_weight: float = 1.0                 # w_kd: τ²·KL to the original teacher
    temperature: float = 4.0
    sparsity_weight: float = 1.0           # λ_s (dormant)
    variance_weight: float = 0.25          # λ_v (dormant)
    feature_variance_weight: float = 1.0   # λ_f (variance)
    mask_size_weight: float = 0.1          # λ_m (variance)
    adversarial_weight: float = 0.0        # λ_a: universal perturbation the masks must defuse (0 = off)
    epsilon: float = 0.2                   # ε: L∞ radius of δ, pixel units
    adversarial_step: float = 0.02         # α: δ's signed ascent step per mini-batch
    adversarial_against: str = "detoxified"  # detoxified: min-max | teacher: δ* on the original teacher, fixed
    perturbation_epochs: int = 2           # passes that search δ* (adversarial_against=teacher)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1                        # Adam, mask logits
    replacement_lr: Optional[float] = None  # Adam, P (null = lr)
    learn_replacement: bool = True
    binarize: Optional[float] = None       # threshold to make M exactly 0/1 after optimising
    augment: bool = False

    def objective(self) -> DetoxObjective:
        return DetoxObjective(form=self.form, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                              temperature=self.temperature, sparsity_weight=self.sparsity_weight,
                              variance_weight=self.variance_weight,
                              feature_variance_weight=self.feature_variance_weight,
                              mask_size_weight=self.mask_size_weight,
                              adversarial_weight=self.adversarial_weight, epsilon=self.epsilon,
                              adversarial_step=self.adversarial_step,
                              adversarial_against=self.adversarial_against,
                              perturbation_epochs=self.perturbation_epochs)

    def detoxify(self, teacher: nn.Module, clean: ImageDataset, *, augment=None,
                 device: torch.device | str = "cpu", bf16: bool = False, seed: int = 0,
                 progress: bool = False) -> DetoxResult:
        """Run :func:`~.optimize.detoxify` on ``clean`` with these settings.

        ``paths`` unset means the teacher's ``pre_relu`` stage preset; ``augment`` is the batched
        augmentation to use when ``self.augment`` is on (ignored otherwise).

        Raises:
            KDGuardError: as :func:`~.optimize.detoxify`.
        """
        paths = list(self.paths) if self.paths else list(stage_paths(teacher, "pre_relu"))
        return detoxify(teacher, clean.images, clean.labels, paths=paths, objective=self.objective(),
                        granularity=self.granularity, combine=self.combine, init_mask=self.init_mask,
                        activation=self.activation, epochs=self.epochs, batch_size=self.batch_size,
                        lr=self.lr, replacement_lr=self.replacement_lr,
                        learn_replacement=self.learn_replacement, binarize=self.binarize,
                        augment=augment if self.augment else None, device=device, bf16=bf16, seed=seed,
                        progress=progress)


@dataclass
class RobustKDDistillConfig:
    """How the student learns from the (detoxified) teacher."""

    method: str = "ofd"                    # ofd (RobustKD) | kd (Hinton KD from the same teacher)
    ce_weight: float = 1.0                 # reference: CE + OFD
    ofd_weight: float = 1.0                # the 1/(1000·B) normalisation is inside the OFD term
    kd_weight: float = 0.9                 # method kd (with ce_weight 0.1 = Hinton's α 0.9)
    temperature: float = 4.0
    margin: str = "auto"                   # auto | bn | none
    normalization: str = "reference"
    stage_weights: str = "reference"
    noise: float = 0.0                     # salt-and-pepper density for the student (reference helper: 0.1)
    student_paths: Optional[list[str]] = None
    teacher_paths: Optional[list[str]] = None


@dataclass
class RobustKDJob:
    teacher: str = MISSING                 # teacher run directory or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    pair: Optional[str] = None             # a presets.PAIRS name; gives the student when unset
    student: Optional[str] = None          # student architecture (default: the pair's, else resnet8)
    data: DataConfig = field(default_factory=DataConfig)  # name defaults to the teacher's dataset
    attack: Optional[AttackConfig] = None  # null = the attack in the teacher's manifest
    clean_fraction: float = 0.2            # clean labelled share of the training data
    detox: DetoxConfig = field(default_factory=DetoxConfig)
    distill: RobustKDDistillConfig = field(default_factory=RobustKDDistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out: str = "runs/robustkd"


def _student_name(job: RobustKDJob) -> str:
    if job.student:
        return job.student
    if job.pair:
        return get_pair(job.pair).student
    return "resnet8"


def _detox_stage(job: RobustKDJob, out: Path, teacher: nn.Module, clean: ImageDataset, data, attack,
                 device) -> tuple[FeatureDetox | None, dict[str, Any]]:
    """Optimise, reuse (a restarted run) or load the detoxification; return it and its record."""
    cfg = job.detox
    if not cfg.enabled:
        return None, {"enabled": False}
    saved, record_file = out / DETOX_FILE, out / "detox_metrics.json"
    stats = None
    if saved.exists():  # a restarted run: keep what was optimised
        detox = FeatureDetox.load(saved)
        if record_file.exists():
            return detox, read_json(record_file)
        seconds = float(detox.metadata.get("seconds", 0.0))
    elif cfg.load:
        detox, seconds = FeatureDetox.load(cfg.load), 0.0
        detox.save(saved, {"teacher": str(job.teacher), "seconds": seconds, "loaded_from": cfg.load})
    else:
        result = cfg.detoxify(teacher, clean, augment=make_augment(job.data, clean) if cfg.augment else None,
                              device=device, bf16=use_bf16(job.train.amp, device, teacher), seed=job.seed,
                              progress=job.train.progress)
        detox, stats, seconds = result.detox, result.stats, result.seconds
        write_json(out / "detox_history.json", result.history)
        if result.perturbation is not None:
            delta = {"delta": result.perturbation.contiguous()}
            atomic_write(out / "detox_perturbation.safetensors", lambda tmp: save_file(delta, str(tmp)))
        if result.perturbation_history:  # adversarial_against=teacher: the δ* search, KL per pass
            write_json(out / "detox_perturbation_search.json", result.perturbation_history)
        detox.save(saved, {"teacher": str(job.teacher), "seconds": seconds, "config": to_dict(cfg)})
    plot_masks(out / "detox_masks.png", detox, stats)
    with detox.to(device).attach(teacher):
        detox_metrics = evaluate_model(teacher, data.test, attack, train_cfg=job.train).to_dict()
    record = {"enabled": True, "seconds": seconds, "paths": detox.paths, "granularity": detox.granularity,
              "summary": detox.summary(), "teacher_detox": detox_metrics}
    write_json(record_file, record)
    return detox, record


def run_robustkd(job: RobustKDJob) -> RunResult:
    """Run the RobustKD job (see the module docstring for what it writes).

    Raises:
        KDGuardError: a bad setting, an unreadable teacher, a dataset that does not match the
            teacher, or any problem of the detox/distillation steps.
    """
    t0 = time.perf_counter()
    student_name = _student_name(job)  # settings are checked before any work is done
    if job.detox.enabled and not job.detox.load:
        job.detox.objective()
    teacher, t_manifest = load_teacher(job.teacher, job.teacher_spec)
    t_dataset = t_manifest.get("dataset", {}).get("name")
    if job.data.name == DEFAULT_DATASET and t_dataset and t_dataset != DEFAULT_DATASET:
        job.data.name = t_dataset  # the teacher's dataset unless one is named
    out = prepare_run(job.out, job, job.seed, parents=("teacher",))
    data = load_splits(job.data, seed=job.seed)
    k = t_manifest.get("model", {}).get("num_classes")
    if k not in (None, data.train.num_classes):
        raise KDGuardError(f"teacher has {k} classes but dataset {data.train.name!r} has "
                           f"{data.train.num_classes}", "distil on the teacher's dataset (data.name=...)")
    attack_cfg = job.attack if job.attack is not None else attack_from_manifest(t_manifest)
    attack = make_attack(attack_cfg, data.train.shape, data.train.num_classes)
    clean = clean_subset(data, job.clean_fraction, job.seed)
    device = resolve_device(job.train.device)
    t_metrics = t_manifest.get("metrics") or evaluate_model(teacher, data.test, attack, train_cfg=job.train).to_dict()

    d0 = time.perf_counter()
    detox, detox_record = _detox_stage(job, out, teacher, clean, data, attack, device)
    detox_wall = time.perf_counter() - d0

    student = build_model(student_name, num_classes=data.train.num_classes, in_channels=data.train.channels,
                          mean=data.train.mean, std=data.train.std)
    dc = job.distill
    distiller = RobustKDDistiller(student, teacher, detox, input_shape=data.train.shape, method=dc.method,
                                  student_paths=dc.student_paths, teacher_paths=dc.teacher_paths,
                                  ce_weight=dc.ce_weight, ofd_weight=dc.ofd_weight, kd_weight=dc.kd_weight,
                                  temperature=dc.temperature, margin=dc.margin, normalization=dc.normalization,
                                  stage_weights=dc.stage_weights, noise=dc.noise)
    label = f"robustkd[{dc.method}{'' if detox is not None else ', no detox'}]"
    s0 = time.perf_counter()
    try:
        trainer = Trainer(distiller, job.train, run_dir=out, augment=make_augment(job.data, clean),
                          evaluate=val_evaluator(data.val, attack, job.train), seed=job.seed, desc=label)
        history = trainer.fit(clean.images, clean.labels)
    finally:
        distiller.close()
    distill_seconds = time.perf_counter() - s0
    s_metrics = evaluate_model(student, data.test, attack, train_cfg=job.train).to_dict()
    s_metrics.update(seconds=time.perf_counter() - t0, detox_seconds=detox_record.get("seconds"),
                     detox_stage_wall=detox_wall, distill_seconds=distill_seconds,
                     distill_epoch_seconds=sum(r.seconds for r in history), n_distill=len(clean))
    manifest = {
        "role": "student", "method": "robustkd", "seed": job.seed, "config": to_dict(job),
        "teacher": str(job.teacher), "pair": job.pair,
        "model": model_spec(student, num_classes=data.train.num_classes, in_channels=data.train.channels,
                            mean=data.train.mean, std=data.train.std),
        "dataset": {"name": data.train.name, "shape": list(data.train.shape), "classes": list(data.train.classes)},
        "attack": attack_record(attack_cfg, attack), "metrics": s_metrics, "teacher_metrics": t_metrics,
        "detox": detox_record, "distiller": {"pairs": distiller.pairs, "margin": distiller.margin_used},
    }
    save_model(out, student, manifest)
    write_json(out / "metrics.json", s_metrics)
    _report(out, job, student_name, t_manifest, t_metrics, detox_record, s_metrics, history, attack, data.test)
    return RunResult(out, s_metrics, student, s_metrics["seconds"])


def _report(out: Path, job: RobustKDJob, student_name: str, t_manifest, t_metrics, detox_record, s_metrics,
            history, attack, test) -> None:
    from ...report import write_run_report

    t_arch = t_manifest.get("model", {}).get("arch", "?")
    rows = [("teacher", t_arch, t_metrics)]
    notes = []
    if detox_record.get("teacher_detox"):
        rows.append(("teacher, detoxified", t_arch, detox_record["teacher_detox"]))
        masked = ", ".join(f"`{p}` {100 * s['fraction_masked']:.1f} %" for p, s in detox_record["summary"].items())
        notes += ["## Detoxification", "",
                  f"Units masked (M > 0.5): {masked}. Detox optimisation took "
                  f"{detox_record.get('seconds') or 0:.1f} s.", "", "![masks](detox_masks.png)", ""]
    rows.append((f"student ({job.distill.method})", student_name, s_metrics))
    notes.append(f"Distillation took {s_metrics['distill_seconds']:.1f} s.")
    write_run_report(out, title=f"RobustKD {t_arch} → {student_name} on {test.name}", rows=rows,
                     history={"student": history}, attack=attack, sample=test, notes="\n".join(notes))


@dataclass
class TriggerJob:
    """Learn the ``robustkd_blend`` trigger on a clean teacher (``trigger_opt.py``)."""

    teacher: str = MISSING                 # a CLEAN teacher run directory or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    data: DataConfig = field(default_factory=DataConfig)  # name defaults to the teacher's dataset
    fraction: float = 0.1                  # share of the training split used (reference: all of it)
    paths: Optional[list[str]] = None      # null = the teacher's stages preset
    top_fraction: float = 0.1              # reference num_n = 10 %
    max_mask: float = 0.2                  # reference clamp(mask, 0, 0.2)
    epochs: int = 200                      # reference
    batch_size: int = 64                   # reference
    lr: float = 0.005                      # reference (Adam)
    normalize_stages: bool = True
    device: str = "auto"
    progress: bool = True
    seed: int = 0
    out: str = "runs/robustkd_trigger"


def run_trigger_job(job: TriggerJob) -> tuple[Path, RobustKDBlend]:
    """Optimise the trigger; write ``trigger.safetensors``, ``trigger.png``, ``trigger.json``.

    Returns ``(path of trigger.safetensors, trigger)``. Use it to poison a teacher with
    ``kdguard train-teacher attack.name=robustkd_blend attack.params.file=<that path>``.

    Raises:
        KDGuardError: bad settings, an unreadable teacher or a dataset that does not match it.
    """
    model, manifest = load_teacher(job.teacher, job.teacher_spec)
    name = manifest.get("dataset", {}).get("name")
    if job.data.name == DEFAULT_DATASET and name and name != DEFAULT_DATASET:
        job.data.name = name
    out = prepare_run(job.out, job, job.seed, parents=("teacher",))
    check_range("trigger fraction", job.fraction, 0.0, 1.0, low_open=True)
    train = load_splits(job.data, seed=job.seed).train
    images = train.images if job.fraction >= 1 else train.images[train.stratified_indices(job.fraction, job.seed)]
    result = optimize_blend_trigger(
        model, images, paths=job.paths, top_fraction=job.top_fraction, max_mask=job.max_mask,
        epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, normalize_stages=job.normalize_stages,
        device=resolve_device(job.device, setting="device"), seed=job.seed, progress=job.progress)
    trigger = result.trigger
    path = trigger.save(out / "trigger.safetensors")
    spread = torch.linspace(0, len(images) - 1, min(6, len(images))).long()  # not all from one class
    plot_trigger(out / "trigger.png", trigger, images[spread])
    write_json(out / "trigger.json", {"teacher": str(job.teacher), "dataset": train.name,
                                      "seconds": result.seconds, "history": result.history,
                                      "channels": result.channels, "targets": result.targets,
                                      "mask_mean": float(trigger.blend_mask.mean()),
                                      "mask_max": float(trigger.blend_mask.max())})
    return path, trigger
