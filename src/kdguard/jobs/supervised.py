"""The supervised jobs: train a (poisoned) teacher, distil a student, evaluate a checkpoint.

Each training job writes one run directory through :class:`kdguard.runs.RunContext`::

    config.yaml      the resolved configuration; run.json: its identity (kdguard.rundir)
    manifest.json    versions, git commit, seed, model spec, attack, metrics (with the weights)
    model.safetensors
    train_state.pt   resumable trainer state (deleted never; reused on restart)
    metrics.jsonl    one line per epoch (losses, validation CA/ASR)
    metrics.json     final test metrics: ca, asr, asr_all, ra, n_clean, n_backdoor, ...
    poison_indices.json (teacher runs)   the poisoned training indices
    report.md + *.png   trigger preview and training curves

Both training jobs run data-parallel under ``torchrun --nproc_per_node N -m kdguard
train-teacher|distill ...`` (:mod:`kdguard.distributed`): rank 0 writes the directory.

Test metrics are computed once, at the end, on the last-epoch model: the test split is never
used for model selection (validation metrics drive the curves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..attacks import make_attack, poison_dataset
from ..checkpoint import load_teacher
from ..config import AttackConfig, DataConfig, DistillJob, TeacherJob, TeacherSpec, TrainConfig
from ..data import clean_subset, load_dataset, load_splits, make_augment
from ..distill.base import Distiller, LogitKD
from ..errors import KDGuardError
from ..models import build_model
from ..runs import RunContext, RunResult, evaluate_model, val_evaluator
from ..runtime import resolve_device
from ..train import Trainer


def train_teacher(job: TeacherJob, *, threads: int | None = None) -> RunResult:
    """Train a teacher on the (optionally poisoned) training split; evaluate CA/ASR on test.

    Args:
        job: the job's settings.
        threads: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).
    """
    ctx = RunContext.open(job, threads=threads, device=job.train.device, device_setting="train.device",
                          distributed=True)
    out = ctx.out
    data = load_splits(job.data, seed=job.seed)
    attack = make_attack(job.attack, data.train.shape, data.train.num_classes)
    train_set = data.train
    if attack is not None:
        poisoned = poison_dataset(data.train, attack, seed=job.attack.seed)
        if ctx.writer:
            poisoned.save_indices(out / "poison_indices.json")
        train_set = poisoned.dataset
    model = build_model(job.model, num_classes=train_set.num_classes, in_channels=train_set.channels,
                        mean=train_set.mean, std=train_set.std)
    trainer = Trainer(model, job.train, run_dir=out, augment=make_augment(job.data, train_set),
                      evaluate=val_evaluator(data.val, attack, job.train), seed=job.seed,
                      desc="teacher")
    history = trainer.fit(train_set.images, train_set.labels)
    metrics = ctx.evaluate(model, data.test, attack, job.train)
    metrics["seconds"] = ctx.elapsed()
    # ``seconds`` is this call only; a resumed run's training time is in its restored history
    metrics["train_seconds"] = sum(r.seconds for r in history)
    ctx.save(model, ctx.manifest("teacher", head={"seed": job.seed}, model=model, dataset=train_set,
                                 attack=(job.attack, attack), metrics=metrics))
    ctx.report(title=f"Teacher {job.model} on {train_set.name}", rows=[("teacher", job.model, metrics)],
               history={"teacher": history}, attack=attack, sample=data.test)
    return RunResult(out, metrics, model, metrics["seconds"])


def build_distiller(job: DistillJob, student: nn.Module, teacher: nn.Module,
                    shape: tuple[int, int, int], num_classes: int, dataset_size: int) -> Distiller:
    """A :class:`LogitKD` for ``kd``; other methods come from the KD-method registry."""
    if job.kd.method == "kd":
        if job.kd.weights or job.kd.options:
            given = "kd.weights" if job.kd.weights else "kd.options"
            raise KDGuardError(f"{given} is set, but kd.method=kd (logit KD) takes only kd.temperature and kd.alpha",
                               "name the methods to weight in kd.method (e.g. kd.method=at+kd), or drop "
                               f"{given}")
        return LogitKD(student, teacher, temperature=job.kd.temperature, alpha=job.kd.alpha)
    try:
        from ..distill.methods import build_distiller as build_method
    except ImportError:  # pragma: no cover - the registry ships with kdguard
        raise KDGuardError(f"KD method {job.kd.method!r} is not available", "use kd") from None
    # kd.temperature/kd.alpha configure plain logit KD; other methods (and the KD part of a
    # combination such as "at+kd") take their options from kd.options.
    method: str | dict[str, float] = dict(job.kd.weights) or job.kd.method
    return build_method(method, student, teacher, input_shape=shape, num_classes=num_classes,
                        dataset_size=dataset_size, **dict(job.kd.options))


def distill(job: DistillJob, *, threads: int | None = None) -> RunResult:
    """Distil the teacher checkpoint into a fresh student on a clean share of the training data.

    Args:
        job: the job's settings.
        threads: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).
    """
    ctx = RunContext.open(job, parents=("teacher",), threads=threads, device=job.train.device,
                          device_setting="train.device", distributed=True)
    out = ctx.out
    teacher, t_manifest = ctx.load_teacher(job.teacher, job.teacher_spec)
    data = load_splits(job.data, seed=job.seed)
    if t_manifest.get("model", {}).get("num_classes") not in (None, data.train.num_classes):
        raise KDGuardError(
            f"teacher has {t_manifest['model']['num_classes']} classes but dataset "
            f"{data.train.name!r} has {data.train.num_classes}", "distil on the teacher's dataset")
    attack_cfg, attack = ctx.attack(job.attack, t_manifest, data.train.shape, data.train.num_classes)
    clean = clean_subset(data, job.clean_fraction, job.seed)
    student = build_model(job.student, num_classes=data.train.num_classes,
                          in_channels=data.train.channels, mean=data.train.mean, std=data.train.std)
    distiller = build_distiller(job, student, teacher, data.train.shape, data.train.num_classes, len(clean))
    trainer = Trainer(distiller, job.train, run_dir=out, augment=make_augment(job.data, clean),
                      evaluate=val_evaluator(data.val, attack, job.train), seed=job.seed,
                      desc=f"student[{job.kd.method}]")
    history = trainer.fit(clean.images, clean.labels)
    s_metrics = ctx.evaluate(student, data.test, attack, job.train)
    t_metrics = t_manifest.get("metrics") or ctx.evaluate(teacher, data.test, attack, job.train)
    s_metrics["seconds"] = ctx.elapsed()
    s_metrics["train_seconds"] = sum(r.seconds for r in history)  # every call of a resumed run
    s_metrics["n_distill"] = len(clean)
    ctx.save(student, ctx.manifest("student", head={"seed": job.seed}, links={"teacher": str(job.teacher)},
                                   model=student, dataset=data.train, attack=(attack_cfg, attack),
                                   metrics=s_metrics, tail={"teacher_metrics": t_metrics}))
    t_arch = t_manifest.get("model", {}).get("arch", "?")
    ctx.report(title=f"Distillation {t_arch} → {job.student} ({job.kd.method}) on {data.train.name}",
               rows=[("teacher", t_arch, t_metrics), (f"student ({job.kd.method})", job.student, s_metrics)],
               history={"student": history}, attack=attack, sample=data.test)
    return RunResult(out, s_metrics, student, s_metrics["seconds"])


def evaluate_checkpoint(checkpoint: str | Path, data_cfg: DataConfig | None = None,
                        attack_cfg: AttackConfig | None = None, *, use_manifest_attack: bool = True,
                        train_cfg: TrainConfig | None = None,
                        spec: TeacherSpec | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint against a dataset's test split and an attack (default: its own).

    ``spec`` describes a bare weights file (architecture, classes, channels, input normalisation).
    The evaluation runs in fp32 unless ``train_cfg.amp`` is ``"on"``. No run directory is written.

    Raises:
        KDGuardError: as :func:`kdguard.checkpoint.load_model`; no dataset known; a bad attack.
    """
    train_cfg = train_cfg or TrainConfig()
    resolve_device(train_cfg.device, setting="--device")  # `kdguard evaluate --device`: fail before loading
    model, manifest = load_teacher(checkpoint, spec)
    if data_cfg is None:
        name = manifest.get("dataset", {}).get("name")
        if not name:
            raise KDGuardError("the checkpoint's manifest names no dataset", "pass --dataset NAME")
        data_cfg = DataConfig(name=name)
    test = load_dataset(data_cfg.name, "test", root=data_cfg.root)
    _, attack = RunContext.attack(attack_cfg, manifest if use_manifest_attack else None, test.shape,
                                  test.num_classes)
    return evaluate_model(model, test, attack, train_cfg=train_cfg).to_dict()


__all__ = ["build_distiller", "distill", "evaluate_checkpoint", "train_teacher"]
