"""The results ledger: one small JSON record per finished cell and seed, and the teachers they
were distilled from, in a directory meant to be committed.

Layout (``--ledger``, default ``results``; one folder per suite)::

    <ledger>/<suite>/<scale>/<cell>/s<seed>.json a cell's record (cell names hold '/': badnets/kd)
    <ledger>/<suite>/teachers/<kind>-<key16>/    a teacher stage: model.safetensors, manifest.json,
                                                 config.yaml, run.json, metrics.json(l), sha256.txt

A record holds the method stage's final metrics (``ca``, ``asr``, ``asr_no_trigger``, ...),
each stage's fingerprint and headline metrics, the teacher's weights digest, the seed, its
validation curve, the wall time of its stages, and where it ran (CPU, threads, device,
kdguard/torch/python versions).

On a machine whose stage cache lacks a teacher the ledger has, the teacher is **restored**
(after checking its weights against ``sha256.txt``) before anything runs, so the cells computed
there are distilled from the same weights as the recorded ones. A record whose teacher digest
differs from the ledger's teacher is refused by the report, and a teacher whose weights differ
from the ledger's one is refused when its records would be written.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KDGuardError
from .plan import CellPlan, SuitePlan
from .stages import JOB_KINDS, STAGE_FILE, read_stage

FORMAT = 1
#: record fields that depend on the machine or the moment, not on the computation
VOLATILE = ("wall_seconds", "machine", "host", "recorded", "versions", "threads_available")
#: files of a teacher stage copied into the ledger
TEACHER_FILES = ("model.safetensors", "manifest.json", "config.yaml", "run.json", "metrics.json",
                 "metrics.jsonl", STAGE_FILE)
DIGEST_FILE = "sha256.txt"
#: headline metrics kept per stage
HEADLINE = ("ca", "asr", "asr_no_trigger", "asr_all", "ra", "collapsed")


def suite_ledger(ledger: str | Path, suite: str) -> Path:
    return Path(ledger).expanduser() / suite


def record_path(ledger: str | Path, suite: str, scale: str, cell: str, seed: int) -> Path:
    return suite_ledger(ledger, suite) / scale / cell / f"s{seed}.json"


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its machine- and time-dependent parts (:data:`VOLATILE`, and every
    metric whose name holds ``seconds``): equal for the same computation anywhere."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k and k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(record)


def _digest(path: Path) -> str | None:
    from ..rundir import weights_digest

    return weights_digest(path)


def _curve(out: Path) -> list[list[float | None]]:
    """``[[epoch or round, CA, ASR], ...]`` of a stage's ``metrics.jsonl`` (validation CA/ASR of
    the epoch loops, test CA/ASR of the data-free evaluations)."""
    path = out / "metrics.jsonl"
    points = []
    if not path.exists():
        return points
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "round" in r and isinstance(r.get("eval"), dict) and r["eval"].get("ca") is not None:
            points.append([r["round"], r["eval"].get("ca"), r["eval"].get("asr")])
        elif "epoch" in r and isinstance(r.get("val"), dict) and r["val"].get("val_ca") is not None:
            points.append([r["epoch"], r["val"].get("val_ca"), r["val"].get("val_asr")])
    return points


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def teacher_stage(plan: SuitePlan, cell: CellPlan) -> int:
    """Index in ``cell.stages`` of the cell's teacher: its last ``teacher`` stage, else the
    method stage's parent, else its first stage."""
    kinds = [plan.stages[k].kind for k in cell.stages]
    if "teacher" in kinds:
        return len(kinds) - 1 - kinds[::-1].index("teacher")
    return max(0, len(cell.stages) - 2)


def build_record(plan: SuitePlan, cell: CellPlan) -> dict[str, Any]:
    """The record of a cell whose stages are all done."""
    import torch

    stages, wall, leaf_stage = [], 0.0, {}
    for name, key in zip(cell.stage_names, cell.stages):
        sp = plan.stages[key]
        out = Path(sp.out)
        done = read_stage(out) or {}
        wall += float(done.get("wall_seconds") or 0.0)
        metrics = JOB_KINDS[sp.kind].metrics(out)
        stages.append({"name": name, "kind": sp.kind, "fingerprint": key,
                       "metrics": {k: metrics.get(k) for k in HEADLINE if k in metrics}})
        leaf_stage = done
    leaf = plan.stages[cell.stages[-1]]
    t_index = teacher_stage(plan, cell)
    t_plan = plan.stages[cell.stages[t_index]]
    return {
        "format": FORMAT, "suite": plan.suite.name, "cell": cell.cell, "axes": cell.axes, "method": cell.method,
        "seed": cell.seed, "scale": plan.scale, "fingerprint": leaf.key,
        "metrics": _scalars(JOB_KINDS[leaf.kind].metrics(Path(leaf.out))),
        "teacher": {"stage": cell.stage_names[t_index], "fingerprint": t_plan.key,
                    "sha256": _digest(Path(t_plan.out)), **stages[t_index]["metrics"]},
        "stages": stages,
        "curve": _curve(Path(leaf.out)),
        "wall_seconds": wall,
        "threads": leaf_stage.get("threads"), "device": leaf_stage.get("device"),
        "machine": leaf_stage.get("machine"), "host": leaf_stage.get("host"),
        "versions": {"kdguard": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_record(ledger: str | Path, record: dict[str, Any]) -> Path:
    """Write a cell's record; a record with the same computation (:func:`comparable`) is kept
    as it is, so re-running a finished suite changes no file."""
    from ..io import write_json

    path = record_path(ledger, record["suite"], record["scale"], record["cell"], record["seed"])
    if path.exists():
        try:
            if comparable(json.loads(path.read_text())) == comparable(record):
                return path
        except ValueError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return path


def read_records(ledger: str | Path, suite: str, scale: str = "cpu") -> tuple[list[dict[str, Any]], list[str]]:
    """The suite's records at ``scale``, and the refused ones (``path: why``): unreadable, or made from a
    teacher whose digest differs from the ledger's copy of that teacher."""
    root = suite_ledger(ledger, suite) / scale
    records, refused = [], []
    if not root.is_dir():
        return records, refused
    for path in sorted(root.rglob("s*.json")):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "cell" not in record or "metrics" not in record:
                raise ValueError("not a cell record")
        except ValueError as e:
            refused.append(f"{path}: {e}")
            continue
        teacher = record.get("teacher") or {}
        stored = teacher_dir(ledger, suite, teacher.get("fingerprint"), _teacher_kind(record))
        expected = _stored_digest(stored) if stored is not None else None
        if expected is not None and teacher.get("sha256") != expected:
            refused.append(f"{path}: teacher sha256 {str(teacher.get('sha256'))[:12]}… differs from the "
                           f"ledger's teacher {expected[:12]}…")
            continue
        records.append(record)
    return records, refused


def _teacher_kind(record: dict[str, Any]) -> str | None:
    teacher = (record.get("teacher") or {}).get("stage")
    return next((s["kind"] for s in record.get("stages", []) if s.get("name") == teacher), None)


def teacher_dir(ledger: str | Path, suite: str, key: str | None, kind: str | None) -> Path | None:
    if not key or not kind:
        return None
    return suite_ledger(ledger, suite) / "teachers" / f"{kind}-{key[:16]}"


def _stored_digest(stored: Path) -> str | None:
    path = stored / DIGEST_FILE
    return path.read_text().split()[0] if path.is_file() and path.read_text().strip() else None


def store_teacher(ledger: str | Path, plan: SuitePlan, key: str) -> None:
    """Copy a done teacher stage into the ledger (once).

    Raises:
        KDGuardError: the ledger holds this teacher with other weights.
    """
    sp = plan.stages[key]
    src = Path(sp.out)
    digest = _digest(src)
    if digest is None:
        return
    dest = teacher_dir(ledger, plan.suite.name, key, sp.kind)
    assert dest is not None
    stored = _stored_digest(dest)
    if stored == digest:
        return
    if stored is not None:
        raise KDGuardError(
            f"the ledger's teacher {str(dest)!r} has weights sha256 {stored[:12]}…, but this machine's "
            f"stage {str(src)!r} has {digest[:12]}…: its cells would mix two teachers",
            f"remove {str(src)!r} so the ledger's teacher is restored, or pass another --ledger")
    from ..io import write_text

    dest.mkdir(parents=True, exist_ok=True)
    for name in TEACHER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    write_text(dest / DIGEST_FILE, f"{digest}  model.safetensors\n")


def restore_teachers(ledger: str | Path, plan: SuitePlan) -> int:
    """Copy the ledger's teachers into the stage cache where a stage is not done; returns how many.

    Raises:
        KDGuardError: a ledger teacher whose weights do not match its ``sha256.txt``.
    """
    from .stages import stage_done

    restored = 0
    for key, sp in plan.stages.items():
        if sp.kind != "teacher" or stage_done(sp.out, key):
            continue
        stored = teacher_dir(ledger, plan.suite.name, key, sp.kind)
        if stored is None or not (stored / "model.safetensors").is_file():
            continue
        expected = _stored_digest(stored)
        actual = _digest(stored)
        if expected is None or expected != actual:
            raise KDGuardError(f"ledger teacher {str(stored)!r}: model.safetensors has sha256 "
                               f"{str(actual)[:12]}…, {DIGEST_FILE} says {str(expected)[:12]}…",
                               "restore the ledger from git (git checkout -- DIR), or pass another --ledger")
        out = Path(sp.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in TEACHER_FILES:
            if (stored / name).is_file():
                shutil.copyfile(stored / name, out / name)
        restored += 1
    return restored
