"""The jobs behind the CLI: train a (poisoned) teacher, distil a student, evaluate a checkpoint.

Each job writes one run directory::

    config.yaml      the resolved configuration
    manifest.json    versions, git commit, seed, model spec, attack, metrics (with the weights)
    model.safetensors
    train_state.pt   resumable trainer state (deleted never; reused on restart)
    metrics.jsonl    one line per epoch (losses, validation CA/ASR)
    metrics.json     final test metrics: ca, asr, asr_all, ra, n_clean, n_backdoor, ...
    poison_indices.json (teacher runs)   the poisoned training indices
    report.md + *.png   trigger preview and training curves

Test metrics are computed once, at the end, on the last-epoch model: the test split is never
used for model selection (validation metrics drive the curves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .attacks import AttackSpec, backdoor_targets, build_attack, non_target_mask, poison_dataset
from .checkpoint import load_teacher, model_spec, save_model
from .config import (AttackConfig, DataConfig, DistillJob, TeacherJob, TeacherSpec, TrainConfig, to_dict,
                     to_yaml)
from .augment import Augment
from .data import ImageDataset, load_dataset
from .distill.base import Distiller, LogitKD
from .errors import KDGuardError, check_range
from .io import write_json, write_text
from .metrics import BackdoorMetrics, evaluate_backdoor
from .models import build_model
from .runtime import configure_threads, resolve_device, seed_everything, use_bf16, use_channels_last
from .train import Trainer
from .trust import refuse_code_from_file


@dataclass
class SplitData:
    """Train (without validation), validation and test splits of one dataset."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


def load_splits(cfg: DataConfig, seed: int = 0) -> SplitData:
    """Load train/test and hold out ``val_fraction`` of train (stratified, seeded) for validation."""
    check_range("validation fraction", cfg.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    train = load_dataset(cfg.name, "train", root=cfg.root)
    test = load_dataset(cfg.name, "test", root=cfg.root)
    rest, val = train.split(cfg.val_fraction, seed=seed)
    return SplitData(rest, val, test)


def make_attack(cfg: AttackConfig | None, shape: tuple[int, int, int], num_classes: int) -> AttackSpec | None:
    """The :class:`AttackSpec` of ``cfg`` for images of ``shape`` (None for no attack).

    ``cfg.name`` may be a preset, a trigger name, or ``pkg.mod:fn`` (the user's trigger
    function, imported here: ``cfg`` must come from the user, not from a file; see
    :func:`attack_from_manifest`). The spec's ``poison_rate`` is ``cfg.poison_rate``: None when
    not given, so a run that only evaluates the attack records no rate; :func:`poison_dataset`
    poisons such a spec at the preset's rate and records that.

    Raises:
        KDGuardError: a target outside ``[0, num_classes)``, or anything :func:`build_attack` refuses.
    """
    if cfg is None or cfg.name in (None, "", "none", "clean"):
        return None
    if not 0 <= cfg.target < num_classes:
        raise KDGuardError(f"target class {cfg.target} is outside [0, {num_classes - 1}]",
                           f"set attack.target to a class index below {num_classes}")
    kwargs: dict[str, Any] = dict(image_shape=shape, target=cfg.target, seed=cfg.seed,
                                  label_mode=cfg.label_mode, **dict(cfg.params))
    if cfg.poison_rate is not None:
        kwargs["poison_rate"] = cfg.poison_rate
    if cfg.poisoning is not None:
        kwargs["poisoning"] = cfg.poisoning
    spec = build_attack(cfg.name, **kwargs)
    spec.poison_rate = cfg.poison_rate  # the preset's default stays in spec.preset_rate
    return spec


def make_augment(cfg: DataConfig, ds: ImageDataset) -> Augment | None:
    return Augment(crop_padding=4, hflip=ds.hflip) if cfg.augment else None


def evaluate_model(model: nn.Module, test: ImageDataset, attack: AttackSpec | None, *,
                   train_cfg: TrainConfig) -> BackdoorMetrics:
    """CA/ASR/ASR-all/RA of ``model`` on ``test`` under ``attack`` (one pass)."""
    device = resolve_device(train_cfg.device)
    model.to(device)
    # fp32 unless bf16 is asked for explicitly: reported metrics must not depend on the CPU
    kw: dict[str, Any] = dict(batch_size=train_cfg.eval_batch_size, device=device,
                              bf16=str(train_cfg.amp).strip().lower() in ("on", "true") and use_bf16("on", device, model),
                              channels_last=use_channels_last(train_cfg.channels_last, device, model))
    if attack is None:
        return evaluate_backdoor(model, test.images, test.labels, **kw)
    return evaluate_backdoor(
        model, test.images, test.labels, trigger=attack.trigger,
        backdoor_target=backdoor_targets(test.labels, attack, test.num_classes),
        non_target=non_target_mask(test.labels, attack), **kw)


def val_evaluator(val: ImageDataset, attack: AttackSpec | None, train_cfg: TrainConfig):
    """Per-epoch validation CA/ASR for the curves (never the test split)."""
    def run(model: nn.Module) -> dict[str, float | None]:
        m = evaluate_model(model, val, attack, train_cfg=train_cfg)
        return {"val_ca": m.ca, "val_asr": m.asr}
    return run


def clean_subset(data: SplitData, fraction: float, seed: int) -> ImageDataset:
    """The defender's clean data: ``fraction`` of the *whole* training set, from the train split.

    Same rule as :func:`kdguard.pipeline.distill`: the validation split is held out first, so
    the share of the remaining train split is ``fraction · (n_train + n_val) / n_train``
    (capped at 1), drawn per class (stratified) with seed ``seed + 1``.

    Args:
        data: splits from :func:`kdguard.pipeline.load_splits`.
        fraction: in (0, 1].
        seed: the run's seed.

    Returns:
        An :class:`ImageDataset` (uint8 images, int64 labels) of about
        ``fraction · (n_train + n_val)`` images.

    Raises:
        KDGuardError: ``fraction`` outside (0, 1].
    """
    check_range("clean fraction", fraction, 0.0, 1.0, low_open=True)
    full = len(data.train) + len(data.val)
    share = min(1.0, fraction * full / len(data.train))
    if share >= 1.0:
        return data.train
    return data.train.subset(data.train.stratified_indices(share, seed=seed + 1))


def attack_record(cfg: AttackConfig | None, attack: AttackSpec | None) -> dict[str, Any] | None:
    """The manifest's ``attack`` entry, in the form :func:`kdguard.pipeline.attack_from_manifest` reads.

    ``poison_rate`` is ``attack.poison_rate``: the rate this run poisoned its training set with
    (train-teacher), the rate copied from the teacher's manifest, or the one the user set in
    ``attack.poison_rate``; None (unknown, not applicable) for an attack given only to evaluate
    a model, never a preset's default the teacher may not have used.
    """
    if attack is None or cfg is None:
        return None
    return {"config": to_dict(cfg), "trigger": attack.trigger.params(), "target": attack.target,
            "label_mode": attack.label_mode, "poisoning": attack.poisoning,
            "poison_rate": attack.poison_rate}


_ATTACK_FIELDS = {"name": (str, type(None)), "target": (int,), "poison_rate": (int, float, type(None)),
                  "label_mode": (str,), "poisoning": (str, type(None)), "seed": (int,), "params": (dict,)}


def attack_from_manifest(manifest: dict[str, Any], *, source: str = "the run's manifest") -> AttackConfig | None:
    """The attack recorded in a run's manifest (:func:`attack_record`), as an :class:`AttackConfig`.

    The manifest is data: an attack whose name (or trigger's name) is an import path
    ``pkg.mod:fn`` is refused before anything is imported, and the record's values are
    type-checked. ``poison_rate`` is the record's resolved rate (None when it has none), and
    parameters naming files (``Trigger.file_params``: resolved paths and their sha256) come from
    the trigger record, so a changed file is refused when the trigger is rebuilt.

    Args:
        manifest: the parsed ``manifest.json``.
        source: the manifest, for messages (e.g. its path).

    Returns:
        None when the manifest records no attack.

    Raises:
        KDGuardError: a malformed record, or one naming a trigger function.
    """
    from .attacks import TRIGGERS

    rec = manifest.get("attack") if isinstance(manifest, dict) else None
    if not rec:
        return None
    config = rec.get("config") if isinstance(rec, dict) else None
    fix = "re-create the run, or give the attack on the command line (attack.name=..., or --attack for evaluate)"
    if not isinstance(config, dict):
        raise KDGuardError(f"{source} has a malformed attack record (no config mapping)", fix)
    trigger = rec.get("trigger") if isinstance(rec.get("trigger"), dict) else {}
    for name in (config.get("name"), trigger.get("name")):
        refuse_code_from_file(name, what="trigger function", source=source,
                              fix=f"pass attack.name={name} (or --attack {name} for evaluate) on the command line")
    for key, value in config.items():
        allowed = _ATTACK_FIELDS.get(key)
        if allowed is None or isinstance(value, bool) or not isinstance(value, allowed):
            raise KDGuardError(f"{source} has a malformed attack record (config.{key} = {value!r})", fix)
    config = {**config, "params": dict(config.get("params") or {})}
    rate = rec.get("poison_rate", config.get("poison_rate"))
    config["poison_rate"] = rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None
    name = trigger.get("name")
    if isinstance(name, str) and name in TRIGGERS:
        for key in TRIGGERS.get(name).file_params:
            if key in trigger:
                config["params"][key] = trigger[key]
    return AttackConfig(**config)


def prepare_run(out: str | Path, job: Any, seed: int, *, parents: tuple[str, ...] = (),
                volatile: tuple[str, ...] = ()) -> Path:
    """Open run directory ``out`` for ``job`` (:func:`kdguard.rundir.open_run`: lock, identity
    check, ``config.yaml`` and ``run.json``), then set threads and seeds.

    Args:
        out: the run directory (``~`` expanded).
        job: the job's structured config.
        seed: seeds Python, NumPy and torch.
        parents: the job's fields naming the weights it reads (e.g. ``("teacher",)``): their
            files' sha256 are part of the run's identity.
        volatile: further dotted keys of ``job`` that do not change what the directory holds.

    Returns:
        The run directory.

    Raises:
        KDGuardError: a bad training or device setting (:func:`kdguard.train.settings.check_job`),
            or see :func:`kdguard.rundir.open_run` (a bad ``out``, a directory in use or holding
            another run; ``--resume`` / ``--overwrite`` decide).
    """
    from .rundir import open_run
    from .train.settings import check_job

    check_job(job)  # before the directory is opened: a rejected job leaves nothing behind
    out = open_run(out, job, parents=parents, volatile=volatile)
    configure_threads()
    seed_everything(seed)
    return out


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    seconds: float


def train_teacher(job: TeacherJob) -> RunResult:
    """Train a teacher on the (optionally poisoned) training split; evaluate CA/ASR on test."""
    t0 = time.perf_counter()
    out = prepare_run(job.out, job, job.seed)
    data = load_splits(job.data, seed=job.seed)
    attack = make_attack(job.attack, data.train.shape, data.train.num_classes)
    train_set = data.train
    if attack is not None:
        poisoned = poison_dataset(data.train, attack, seed=job.attack.seed)
        poisoned.save_indices(out / "poison_indices.json")
        train_set = poisoned.dataset
    model = build_model(job.model, num_classes=train_set.num_classes, in_channels=train_set.channels,
                        mean=train_set.mean, std=train_set.std)
    trainer = Trainer(model, job.train, run_dir=out, augment=make_augment(job.data, train_set),
                      evaluate=val_evaluator(data.val, attack, job.train), seed=job.seed,
                      desc="teacher")
    history = trainer.fit(train_set.images, train_set.labels)
    metrics = evaluate_model(model, data.test, attack, train_cfg=job.train).to_dict()
    metrics["seconds"] = time.perf_counter() - t0
    # ``seconds`` is this call only; a resumed run's training time is in its restored history
    metrics["train_seconds"] = sum(r.seconds for r in history)
    manifest = {
        "role": "teacher", "seed": job.seed, "config": to_dict(job),
        "model": model_spec(model, num_classes=train_set.num_classes, in_channels=train_set.channels,
                            mean=train_set.mean, std=train_set.std),
        "dataset": {"name": train_set.name, "shape": list(train_set.shape), "classes": list(train_set.classes)},
        "attack": attack_record(job.attack, attack), "metrics": metrics,
    }
    save_model(out, model, manifest)
    write_json(out / "metrics.json", metrics)
    from .report import write_run_report
    write_run_report(out, title=f"Teacher {job.model} on {train_set.name}",
                     rows=[("teacher", job.model, metrics)], history={"teacher": history},
                     attack=attack, sample=data.test)
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
        from .distill.methods import build_distiller as build_method
    except ImportError:  # pragma: no cover - the registry ships with kdguard
        raise KDGuardError(f"KD method {job.kd.method!r} is not available", "use kd") from None
    # kd.temperature/kd.alpha configure plain logit KD; other methods (and the KD part of a
    # combination such as "at+kd") take their options from kd.options.
    method: str | dict[str, float] = dict(job.kd.weights) or job.kd.method
    return build_method(method, student, teacher, input_shape=shape, num_classes=num_classes,
                        dataset_size=dataset_size, **dict(job.kd.options))


def distill(job: DistillJob) -> RunResult:
    """Distil the teacher checkpoint into a fresh student on a clean share of the training data."""
    t0 = time.perf_counter()
    out = prepare_run(job.out, job, job.seed, parents=("teacher",))
    teacher, t_manifest = load_teacher(job.teacher, job.teacher_spec)
    data = load_splits(job.data, seed=job.seed)
    if t_manifest.get("model", {}).get("num_classes") not in (None, data.train.num_classes):
        raise KDGuardError(
            f"teacher has {t_manifest['model']['num_classes']} classes but dataset "
            f"{data.train.name!r} has {data.train.num_classes}", "distil on the teacher's dataset")
    attack_cfg = job.attack if job.attack is not None else attack_from_manifest(t_manifest)
    attack = make_attack(attack_cfg, data.train.shape, data.train.num_classes)
    clean = clean_subset(data, job.clean_fraction, job.seed)
    student = build_model(job.student, num_classes=data.train.num_classes,
                          in_channels=data.train.channels, mean=data.train.mean, std=data.train.std)
    distiller = build_distiller(job, student, teacher, data.train.shape, data.train.num_classes, len(clean))
    trainer = Trainer(distiller, job.train, run_dir=out, augment=make_augment(job.data, clean),
                      evaluate=val_evaluator(data.val, attack, job.train), seed=job.seed,
                      desc=f"student[{job.kd.method}]")
    history = trainer.fit(clean.images, clean.labels)
    s_metrics = evaluate_model(student, data.test, attack, train_cfg=job.train).to_dict()
    t_metrics = t_manifest.get("metrics") or evaluate_model(teacher, data.test, attack,
                                                            train_cfg=job.train).to_dict()
    s_metrics["seconds"] = time.perf_counter() - t0
    s_metrics["train_seconds"] = sum(r.seconds for r in history)  # every call of a resumed run
    s_metrics["n_distill"] = len(clean)
    manifest = {
        "role": "student", "seed": job.seed, "config": to_dict(job), "teacher": str(job.teacher),
        "model": model_spec(student, num_classes=data.train.num_classes, in_channels=data.train.channels,
                            mean=data.train.mean, std=data.train.std),
        "dataset": {"name": data.train.name, "shape": list(data.train.shape),
                    "classes": list(data.train.classes)},
        "attack": attack_record(attack_cfg, attack), "metrics": s_metrics, "teacher_metrics": t_metrics,
    }
    save_model(out, student, manifest)
    write_json(out / "metrics.json", s_metrics)
    from .report import write_run_report
    t_arch = t_manifest.get("model", {}).get("arch", "?")
    write_run_report(out, title=f"Distillation {t_arch} → {job.student} ({job.kd.method}) on {data.train.name}",
                     rows=[("teacher", t_arch, t_metrics), (f"student ({job.kd.method})", job.student, s_metrics)],
                     history={"student": history}, attack=attack, sample=data.test)
    return RunResult(out, s_metrics, student, s_metrics["seconds"])


def evaluate_checkpoint(checkpoint: str | Path, data_cfg: DataConfig | None = None,
                        attack_cfg: AttackConfig | None = None, *, use_manifest_attack: bool = True,
                        train_cfg: TrainConfig | None = None,
                        spec: TeacherSpec | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint against a dataset's test split and an attack (default: its own).

    ``spec`` describes a bare weights file (architecture, classes, channels, input normalisation).
    The evaluation runs in fp32 unless ``train_cfg.amp`` is ``"on"``.

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
    if attack_cfg is None and use_manifest_attack:
        attack_cfg = attack_from_manifest(manifest)
    attack = make_attack(attack_cfg, test.shape, test.num_classes)
    return evaluate_model(model, test, attack, train_cfg=train_cfg).to_dict()
