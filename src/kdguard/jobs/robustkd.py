"""The RobustKD job: detoxify a teacher's features on clean data, then distil a student from it.

``run_robustkd(job)`` writes one run directory (like :func:`kdguard.jobs.distill`)::

    config.yaml           the resolved RobustKDJob
    detox.safetensors     the masks' logits Z and replacements P per stage (FeatureDetox.save)
    detox_masks.png       mask value per stage and channel, with the clean variance overlaid
    detox_history.json    per-epoch detox losses, clean accuracy, agreement, masked fraction
    detox_metrics.json    CA/ASR of the detoxified teacher on the test split, and the wall time
    detox_perturbation.safetensors   the final δ (adversarial term on)
    detox_perturbation_search.json   mean KL per δ* search pass (adversarial_against=teacher)
    model.safetensors + manifest.json   the student; metrics.json (its CA/ASR and the timings)
    train_state.pt, metrics.jsonl, report.md, curves.png, trigger_preview.png

With ``detox.only=true`` the run stops after the detoxification: ``metrics.json`` holds the
detoxified teacher's CA/ASR, its masked share of units and the timings, and no student is trained
(no weights, no manifest).

A run restarted on the same directory reuses ``detox.safetensors`` and resumes the student's
training from ``train_state.pt``. The test split is used only for the final metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import time

import torch
from safetensors.torch import save_file
from torch import nn

from ..data import ImageDataset, clean_subset, load_splits, make_augment
from ..defenses.robustkd import (DETOX_FILE, FeatureDetox, RobustKDBlend, RobustKDDistiller,
                                 RobustKDJob, TriggerJob, optimize_blend_trigger)
from ..defenses.robustkd.config import DEFAULT_DATASET, student_name
from ..defenses.robustkd.plots import plot_masks, plot_trigger
from ..config import to_dict
from ..errors import KDGuardError, check_range
from ..io import atomic_write, read_json, write_json
from ..models import build_model
from ..runs import RunContext, RunResult, val_evaluator
from ..runtime import resolve_device
from ..runtime import use_bf16
from ..train import Trainer


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
        detox_metrics = RunContext.evaluate(teacher, data.test, attack, job.train)
    record = {"enabled": True, "seconds": seconds, "paths": detox.paths, "granularity": detox.granularity,
              "summary": detox.summary(), "teacher_detox": detox_metrics}
    write_json(record_file, record)
    return detox, record


def run_robustkd(job: RobustKDJob, *, threads: int | None = None) -> RunResult:
    """Run the RobustKD job (see the module docstring for what it writes).

    ``threads``: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: a bad setting, an unreadable teacher, a dataset that does not match the
            teacher, or any problem of the detox/distillation steps.
    """
    t0 = time.perf_counter()
    arch = student_name(job)  # settings are checked before any work is done
    if job.detox.only and not job.detox.enabled:
        raise KDGuardError("detox.only=true evaluates the detoxified teacher, but detox.enabled=false",
                           "set detox.enabled=true, or drop detox.only")
    if job.detox.enabled and not job.detox.load:
        job.detox.objective()
    teacher, t_manifest = RunContext.load_teacher(job.teacher, job.teacher_spec)
    t_dataset = t_manifest.get("dataset", {}).get("name")
    if job.data.name == DEFAULT_DATASET and t_dataset and t_dataset != DEFAULT_DATASET:
        job.data.name = t_dataset  # the teacher's dataset unless one is named
    run = RunContext.open(job, parents=("teacher",), threads=threads, device=job.train.device,
                          device_setting="train.device", t0=t0)
    out = run.out
    data = load_splits(job.data, seed=job.seed)
    k = t_manifest.get("model", {}).get("num_classes")
    if k not in (None, data.train.num_classes):
        raise KDGuardError(f"teacher has {k} classes but dataset {data.train.name!r} has "
                           f"{data.train.num_classes}", "distil on the teacher's dataset (data.name=...)")
    attack_cfg, attack = run.attack(job.attack, t_manifest, data.train.shape, data.train.num_classes)
    clean = clean_subset(data, job.clean_fraction, job.seed)
    device = run.device
    t_metrics = t_manifest.get("metrics") or run.evaluate(teacher, data.test, attack, job.train)

    d0 = time.perf_counter()
    detox, detox_record = _detox_stage(job, out, teacher, clean, data, attack, device)
    detox_wall = time.perf_counter() - d0
    if job.detox.only:
        return _detox_only(run, detox_record, detox_wall)

    student = build_model(arch, num_classes=data.train.num_classes, in_channels=data.train.channels,
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
    s_metrics = run.evaluate(student, data.test, attack, job.train)
    s_metrics.update(seconds=run.elapsed(), detox_seconds=detox_record.get("seconds"),
                     detox_stage_wall=detox_wall, distill_seconds=distill_seconds,
                     distill_epoch_seconds=sum(r.seconds for r in history), n_distill=len(clean))
    run.save(student, run.manifest(
        "student", head={"method": "robustkd", "seed": job.seed},
        links={"teacher": str(job.teacher), "pair": job.pair}, model=student, dataset=data.train,
        attack=(attack_cfg, attack), metrics=s_metrics,
        tail={"teacher_metrics": t_metrics, "detox": detox_record,
              "distiller": {"pairs": distiller.pairs, "margin": distiller.margin_used}}))
    _report(run, job, arch, t_manifest, t_metrics, detox_record, s_metrics, history, attack, data.test)
    return RunResult(out, s_metrics, student, s_metrics["seconds"])


def _detox_only(run: RunContext, detox_record: dict, detox_wall: float) -> RunResult:
    """``detox.only``: the detoxified teacher's test metrics are the run's result (no student,
    so no weights: ``detox.safetensors`` and the teacher named in it are what was evaluated)."""
    summary = detox_record["summary"]
    units = sum(s["units"] for s in summary.values())
    masked = sum(s["fraction_masked"] * s["units"] for s in summary.values()) / max(units, 1)
    metrics = {**detox_record["teacher_detox"], "fraction_masked": masked,
               "detox_seconds": detox_record.get("seconds"), "detox_stage_wall": detox_wall,
               "seconds": run.elapsed()}
    run.write_metrics(metrics)
    return RunResult(run.out, metrics, None, metrics["seconds"])  # type: ignore[arg-type]


def _report(run: RunContext, job: RobustKDJob, student_name: str, t_manifest, t_metrics, detox_record,
            s_metrics, history, attack, test) -> None:
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
    run.report(title=f"RobustKD {t_arch} → {student_name} on {test.name}", rows=rows,
               history={"student": history}, attack=attack, sample=test, notes="\n".join(notes))


def run_trigger_job(job: TriggerJob, *, threads: int | None = None) -> tuple[Path, RobustKDBlend]:
    """Optimise the trigger; write ``trigger.safetensors``, ``trigger.png``, ``trigger.json``.

    ``threads``: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Returns ``(path of trigger.safetensors, trigger)``. Use it to poison a teacher with
    ``kdguard train-teacher attack.name=robustkd_blend attack.params.file=<that path>``.

    Raises:
        KDGuardError: bad settings, an unreadable teacher or a dataset that does not match it.
    """
    model, manifest = RunContext.load_teacher(job.teacher, job.teacher_spec)
    name = manifest.get("dataset", {}).get("name")
    if job.data.name == DEFAULT_DATASET and name and name != DEFAULT_DATASET:
        job.data.name = name
    run = RunContext.open(job, parents=("teacher",), threads=threads)
    out = run.out
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
