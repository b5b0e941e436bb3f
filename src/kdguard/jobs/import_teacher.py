"""A teacher kdguard did not train: a bare weights file turned into a kdguard run directory.

``kdguard import-teacher --teacher FILE --teacher-arch NAME --num-classes K out=DIR`` loads the
file as data (:func:`kdguard.checkpoint.load_teacher`: safetensors or weights-only ``torch.load``;
``module.`` prefixes and ``state_dict``/``model``/``net`` nesting undone; finite floating-point
weights only), and writes ``DIR/model.safetensors`` and ``DIR/manifest.json`` recording the
architecture, the input convention, the source file and its sha256, and (when a dataset is named)
the teacher's test metrics. Later commands then take ``--teacher DIR`` with no other flag, except
for an architecture given as an import path (``pkg.mod:factory``): kdguard never imports code
named by a file, so such a teacher needs ``--teacher-arch`` again on every command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from ..attacks import attack_record, make_attack
from ..checkpoint import MANIFEST, read_manifest, save_model, sha256_file, weights_digest
from ..config import AttackConfig, DataConfig, TeacherSpec, TrainConfig
from ..data import load_dataset
from ..errors import KDGuardError
from ..io import write_json
from ..runs import RunContext, dataset_record


@dataclass
class ImportJob:
    """Settings of ``kdguard import-teacher``."""

    teacher: str = MISSING                 # the weights file (.safetensors, .pt, .pth) or a run directory
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)
    data: DataConfig = field(default_factory=lambda: DataConfig(name=""))  # "" = do not evaluate
    attack: Optional[AttackConfig] = None  # the teacher's suspected trigger, if known (evaluated, recorded)
    device: str = "auto"
    out: str = "runs/imported_teacher"


@dataclass
class ImportResult:
    run_dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any] | None


def import_teacher(job: ImportJob, *, threads: int | None = None) -> ImportResult:
    """Load ``job.teacher`` as data and write it as a kdguard run directory ``job.out``.

    Returns:
        The run directory, the manifest written, and the test metrics (``None`` without a
        dataset). Metrics are fp32: ``ca`` and, with an attack, ``asr`` and its no-trigger rate.

    ``threads``: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: as :func:`kdguard.checkpoint.load_teacher` (no architecture, weights that
            do not match it, non-finite weights, an import path read from a manifest); a teacher
            whose class count differs from the dataset's; ``out`` equal to the source directory.
    """
    t0 = time.perf_counter()
    source = Path(job.teacher).expanduser()
    model, manifest = RunContext.load_teacher(source, job.teacher_spec)  # validate before writing anything
    if source.is_dir() and Path(job.out).expanduser().resolve() == source.resolve():
        raise KDGuardError(f"out={job.out!r} is the source directory itself", "write to another out=DIR")
    spec = manifest["model"]
    metrics = None
    data_record = manifest.get("dataset")
    attack_cfg = job.attack
    attack = None
    test = None
    if job.data.name:
        test = load_dataset(job.data.name, "test", root=job.data.root)
        if spec["num_classes"] != test.num_classes or spec["in_channels"] != test.channels:
            raise KDGuardError(f"the teacher ({spec['num_classes']} classes, {spec['in_channels']} channels) "
                               f"does not match dataset {test.name!r} ({test.num_classes} classes, "
                               f"{test.channels} channels)", "pass the teacher's own dataset as data.name=NAME")
        attack = make_attack(attack_cfg, test.shape, test.num_classes)
        data_record = dataset_record(test)
    run = RunContext.open(job, seed=0, parents=("teacher",), threads=threads, t0=t0)
    out = run.out
    if test is not None:
        metrics = run.evaluate(model, test, attack, TrainConfig(device=job.device, amp="off"))
        metrics["seconds"] = run.elapsed()
    record = attack_record(attack_cfg, attack) if attack is not None else None
    if record is not None:
        record["poison_rate"] = None  # the trigger is the user's guess; no poisoning is known
    source_file = source / "model.safetensors" if source.is_dir() else source
    imported = {"source": str(source.resolve()), "sha256": sha256_file(source_file),
                "format": source_file.suffix.lstrip(".")}
    save_model(out, model, run.manifest("teacher", head={"imported": imported}, model=spec, dataset=data_record,
                                        attack=record, metrics=metrics))
    # the digest of the weights as stored here (keys unprefixed, safetensors), for later checks
    written = read_manifest(out)
    written["imported"]["weights_sha256"] = weights_digest(out)
    write_json(out / MANIFEST, written)
    new_manifest = written
    if metrics is not None:
        run.write_metrics(metrics)
    return ImportResult(out, new_manifest, metrics)
