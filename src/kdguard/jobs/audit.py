"""``kdguard audit``: is this teacher backdoored, towards which class, with what trigger?

Loads the teacher as data (a kdguard run directory, or a bare weights file with the teacher
flags of :class:`kdguard.config.TeacherSpec`), takes the defender's clean share of the training
split exactly as distillation does (:func:`kdguard.data.clean_subset`, default 5 %), runs
:func:`kdguard.audit.audit_model` and writes the run directory::

    audit.json            verdict, suspected targets, per-class sizes / indices, timings, teacher digest
    metrics.json          the verdict in brief (for tables and suites)
    triggers.safetensors  every class's reconstructed mask/pattern (and additive δ, dense and smooth)
    triggers/class_K_{pattern,mask}.npy   every class's trigger as the ``patch`` trigger reads them
    pictures/*.png, report.md, report.html

No weights are written: the audit describes the teacher it names by path and sha256.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from ..audit.core import AUDIT_SEARCH, SMOOTH_GRID, AuditResult, AuditSettings, audit_model, cap_images
from ..audit.reachability import AdditiveSearch, TriggerSearch, check_clean_set
from ..audit.report import plot_class, plot_indices, save_triggers, trigger_files, write_reports
from ..audit.shuffle_check import ShuffleCheck
from ..checkpoint import weights_digest
from ..config import AttackConfig, DataConfig, TeacherSpec
from ..data import clean_subset, load_splits
from ..defenses.config import AUTO_DATASET
from ..errors import KDGuardError, check_range
from ..io import write_json
from ..runs import RunContext


@dataclass
class AuditConfig:
    """The checks and their budgets (defaults: :class:`kdguard.audit.AuditSettings`)."""

    epochs: int = AUDIT_SEARCH.epochs        # mask search: passes over the clean images per class
    batch_size: int = AUDIT_SEARCH.batch_size
    max_images: int = 1000                   # clean images used at most (stratified); 0 = all
    additive: bool = True                    # the additive L∞ search
    eps_max: float = AdditiveSearch.eps_max  # its largest budget, [0, 1] pixel units
    smooth: bool = False                     # the smooth additive search (bilinear from a coarse grid); opt-in
    smooth_grid: int = SMOOTH_GRID           # its control grid per side (capped at the image size)
    shuffle: bool = True                     # the shuffle test (ABD's vaccine ensemble)
    shuffle_layers: int = ShuffleCheck.layers
    shuffle_ensemble: int = ShuffleCheck.ensemble
    shuffle_rounds: int = ShuffleCheck.rounds
    shuffle_collapse: float = ShuffleCheck.collapse  # share sent to one class for the shuffle signal
    threshold: float = 2.0                   # anomaly index of a signal (Neural Cleanse: 2)
    votes: int = 2                           # signals on one class for "backdoored"


@dataclass
class AuditJob:
    """Settings of ``kdguard audit``."""

    teacher: str = MISSING                   # run directory or bare weights file (with the teacher flags)
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)
    data: DataConfig = field(default_factory=lambda: DataConfig(name=AUTO_DATASET, augment=False))
    clean_fraction: float = 0.05             # share of the whole training set the auditor holds
    audit: AuditConfig = field(default_factory=AuditConfig)
    device: str = "auto"
    seed: int = 0
    out: str = "runs/audit"


@dataclass
class AuditRun:
    run_dir: Path
    result: AuditResult
    record: dict[str, Any]


def audit_settings(cfg: AuditConfig, seed: int) -> AuditSettings:
    """The :class:`AuditSettings` of ``cfg`` (raises :class:`KDGuardError` on a bad value)."""
    return AuditSettings(
        search=TriggerSearch(epochs=cfg.epochs, batch_size=cfg.batch_size),
        additive=AdditiveSearch(eps_max=cfg.eps_max, batch_size=cfg.batch_size) if cfg.additive else None,
        smooth=AdditiveSearch(eps_max=cfg.eps_max, batch_size=cfg.batch_size, grid=cfg.smooth_grid)
        if cfg.smooth else None,
        shuffle=ShuffleCheck(layers=cfg.shuffle_layers, ensemble=cfg.shuffle_ensemble,
                             rounds=cfg.shuffle_rounds, collapse=cfg.shuffle_collapse) if cfg.shuffle else None,
        max_images=cfg.max_images, threshold=cfg.threshold, votes=cfg.votes, seed=seed)


def run_audit(job: AuditJob, *, threads: int | None = None) -> AuditRun:
    """Audit ``job.teacher`` and write the run directory ``job.out`` (see the module docstring).

    ``threads``: torch's intra-op threads (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: a bad setting; a teacher that cannot be loaded (see
            :func:`kdguard.checkpoint.load_teacher`); no dataset named for a bare weights file; a
            dataset whose classes or channels differ from the teacher's; a clean share holding
            one class only; ``out`` equal to the teacher's directory; see
            :func:`kdguard.runs.RunContext.open` for the run directory.
    """
    t0 = time.perf_counter()
    settings = audit_settings(job.audit, job.seed)  # every check before anything is written
    check_range("clean fraction", job.clean_fraction, 0.0, 1.0, low_open=True)
    source = Path(job.teacher).expanduser()
    model, manifest = RunContext.load_teacher(source, job.teacher_spec)
    if source.is_dir() and Path(job.out).expanduser().resolve() == source.resolve():
        raise KDGuardError(f"out={job.out!r} is the teacher's own directory", "write the audit to another out=DIR")
    if job.data.name == AUTO_DATASET:
        name = (manifest.get("dataset") or {}).get("name")
        if not name:
            raise KDGuardError(f"the teacher {job.teacher!r} names no dataset",
                               "pass data.name=NAME (the teacher's dataset, e.g. cifar10)")
        job.data.name = name
    spec = manifest["model"]
    run = RunContext.open(job, parents=("teacher",), threads=threads, device=job.device, t0=t0)
    data = load_splits(job.data, seed=job.seed)
    if spec.get("num_classes") != data.train.num_classes or spec.get("in_channels", data.train.channels) \
            != data.train.channels:
        raise KDGuardError(f"the teacher ({spec.get('num_classes')} classes, {spec.get('in_channels')} channels) "
                           f"does not match dataset {data.train.name!r} ({data.train.num_classes} classes, "
                           f"{data.train.channels} channels)", "audit on the teacher's own dataset (data.name=NAME)")
    clean = clean_subset(data, job.clean_fraction, job.seed)
    model = model.to(run.device).eval()
    result = audit_model(model, clean.images, clean.labels, settings=settings, device=run.device)
    out = run.out
    targets = list(result.verdict.targets)
    shown = targets or [max(range(len(result.classes)), key=lambda k: max(result.classes[k].index.values()))]
    save_triggers(out, result, list(range(len(result.classes))))
    pictures_dir = out / "pictures"
    pictures_dir.mkdir(exist_ok=True)
    x, y = _pictured(clean, settings)
    pictures = [plot_indices(pictures_dir / "indices.png", result, settings.threshold).name]
    for k in shown:
        pictures.append(plot_class(pictures_dir / f"class_{k}.png", model, result, k, x, y,
                                   list(data.train.classes)).name)
    record = {
        "kind": "audit",
        "teacher": {"path": str(source.resolve()), "sha256": weights_digest(source),
                    "arch": spec.get("arch"), "num_classes": spec.get("num_classes"),
                    "recorded_attack": _recorded_attack(manifest)},
        "dataset": data.train.name, "clean_fraction": job.clean_fraction, "seed": job.seed,
        "out": str(out), **result.to_dict(),
        "pictured_classes": shown, "threads": run.threads, "device": str(run.device),
    }
    record["seconds"]["total"] = run.elapsed()
    write_json(out / "audit.json", record)
    run.write_metrics({"verdict": record["verdict"], "suspected_targets": targets,
                       "clean_accuracy": result.clean_accuracy, "seconds": record["seconds"]["total"]})
    write_reports(out, record, pictures)
    return AuditRun(out, result, record)


def audit_trigger(audit_dir: str | Path, target: int | None = None) -> AttackConfig:
    """The reconstructed trigger of an audit run as an attack configuration (``patch`` trigger).

    Args:
        audit_dir: a ``kdguard audit`` run directory.
        target: the class whose trigger to use; None = the audit's first suspected target.

    Returns:
        ``AttackConfig(name="patch", target=K, params={pattern_file, mask_file, position})``
        reading ``triggers/class_K_{pattern,mask}.npy`` (paths built here, never read from a file).

    Raises:
        KDGuardError: no ``audit.json`` in ``audit_dir`` or an unreadable one; no suspected target
            and no ``target``; a class outside the audit's; missing trigger files.
    """
    d = Path(audit_dir).expanduser()
    try:
        record = json.loads((d / "audit.json").read_text())
    except (OSError, ValueError) as e:
        raise KDGuardError(f"cannot read the audit in {str(audit_dir)!r} ({type(e).__name__})",
                           "point --from-audit at a `kdguard audit` run directory") from None
    classes = record.get("classes") if isinstance(record, dict) else None
    suspected = record.get("suspected_targets") if isinstance(record, dict) else None
    if not isinstance(classes, list) or not isinstance(suspected, list) \
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in suspected):
        raise KDGuardError(f"{str(d / 'audit.json')!r} is not an audit record",
                           "point --from-audit at a `kdguard audit` run directory")
    if target is None:
        if not suspected:
            raise KDGuardError(f"the audit in {str(audit_dir)!r} suspects no class (verdict {record.get('verdict')!r})",
                               "pass --audit-class K to use class K's reconstructed trigger anyway")
        target = suspected[0]
    if not 0 <= int(target) < len(classes):
        raise KDGuardError(f"class {target} is outside the audit's {len(classes)} classes",
                           f"pass --audit-class between 0 and {len(classes) - 1}")
    pattern, mask = trigger_files(d, int(target))
    if not (pattern.is_file() and mask.is_file()):
        raise KDGuardError(f"the audit in {str(audit_dir)!r} lacks class {target}'s trigger files",
                           "rerun `kdguard audit` into a new out=DIR")
    return AttackConfig(name="patch", target=int(target),
                        params={"pattern_file": str(pattern.resolve()), "mask_file": str(mask.resolve()),
                                "position": [0, 0]})


def _recorded_attack(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The attack the teacher's manifest records (name, target), for comparing verdicts with the
    truth where it is known; None for a clean or foreign teacher."""
    attack = manifest.get("attack")
    if not isinstance(attack, dict):
        return None
    config = attack.get("config") if isinstance(attack.get("config"), dict) else {}
    name = config.get("name")
    target = attack.get("target", config.get("target"))
    if not name:
        return None
    return {"name": str(name), "target": int(target) if isinstance(target, int) else None,
            "label_mode": attack.get("label_mode")}


def _pictured(clean, settings: AuditSettings):
    return cap_images(check_clean_set(clean.images, clean.labels), clean.labels, settings.max_images, settings.seed)


__all__ = ["AuditConfig", "AuditJob", "AuditRun", "audit_settings", "audit_trigger", "run_audit"]
