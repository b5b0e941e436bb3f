"""The job kinds a suite stage may run, and running one stage in this process.

Each kind names the job's typed schema (built from ``key=value`` overrides by the same builders
as the CLI), the job function of :mod:`kdguard.jobs` that runs it, the field that holds its
parent weights, and how to read the finished stage's final metrics.

A stage is **done** when its run directory holds :data:`STAGE_FILE` with the stage's key: the
job function returned. A stage killed before that is run again with the same job, which
continues its run directory (same fingerprint) from the last saved training state.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KDGuardError, unknown_name

#: written into a stage's run directory when its job has returned
STAGE_FILE = "suite_stage.json"


def _build(schema: type, overrides: list[str]) -> Any:
    from ..config import build_config

    job = build_config(schema, None, overrides)
    check = getattr(job, "check_settings", None)
    if callable(check):
        check()
    return job


# Builders and runners import their job modules when called, so reading a suite file imports
# no training code.

def _teacher(o: list[str]) -> Any:
    from ..config import TeacherJob
    return _build(TeacherJob, o)


def _distill(o: list[str]) -> Any:
    from ..config import DistillJob
    return _build(DistillJob, o)


def _datafree(o: list[str]) -> Any:
    from ..jobs.datafree import build_datafree_job
    return build_datafree_job(None, o)


def _datafree_fork(o: list[str]) -> Any:
    from ..jobs.datafree import build_fork_job
    return build_fork_job(o)


def _defend(o: list[str]) -> Any:
    from ..defenses.config import DefenseJob
    return _build(DefenseJob, o)


def _robustkd(o: list[str]) -> Any:
    from ..defenses.robustkd.config import RobustKDJob
    return _build(RobustKDJob, o)


def _trigger(o: list[str]) -> Any:
    from ..defenses.robustkd.config import TriggerJob
    return _build(TriggerJob, o)


def _audit(o: list[str]) -> Any:
    from ..jobs.audit import AuditJob
    return _build(AuditJob, o)


def _ssl(name: str) -> Callable[[list[str]], Any]:
    def build(o: list[str]) -> Any:
        from ..ssl import config as ssl_config
        return _build(getattr(ssl_config, name), o)
    return build


def _run(name: str) -> Callable[[Any, int], Any]:
    def run(job: Any, threads: int) -> Any:
        from .. import jobs
        return getattr(jobs, name)(job, threads=threads)
    return run


def _metrics_json(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _ssl_defend_metrics(out: Path) -> dict[str, Any]:
    """The cell row of an SSL defence's ``grid.json`` as CA/ASR (means over downstream tasks)."""
    path = out / "grid.json"
    if not path.exists():
        return {}
    rows = [r for r in json.loads(path.read_text()).get("rows", []) if r.get("kind") == "cell"]
    if not rows:
        return {}
    row = rows[-1]
    return {"ca": row.get("mean_ca"), "asr": row.get("mean_asr"), "asr_all": row.get("mean_asr_all"),
            "ca_cost": row.get("ca_cost"), "results": row.get("results")}


@dataclass(frozen=True)
class JobKind:
    """A job a stage can run."""

    build: Callable[[list[str]], Any]          # key=value overrides → typed job (checked)
    run: Callable[[Any, int], Any]             # (job, threads) → result; writes job.out
    parent: str | None                         # the field of the parent weights (``parent:``)
    metrics: Callable[[Path], dict[str, Any]] = _metrics_json
    weights: bool = True                       # leaves model.safetensors (a teacher for children)


#: kind → job (``job:`` of a stage)
JOB_KINDS: dict[str, JobKind] = {
    "teacher": JobKind(_teacher, _run("train_teacher"), None),
    "distill": JobKind(_distill, _run("distill"), "teacher"),
    "datafree": JobKind(_datafree, _run("run_datafree"), "teacher"),
    "datafree-fork": JobKind(_datafree_fork, _run("run_datafree_fork"), "run"),
    "defend": JobKind(_defend, _run("run_defense"), "model"),
    "robustkd": JobKind(_robustkd, _run("run_robustkd"), "teacher"),
    "robustkd-trigger": JobKind(_trigger, _run("run_trigger_job"), "teacher", weights=False),
    "audit": JobKind(_audit, _run("run_audit"), "teacher", weights=False),
    "ssl-pretrain": JobKind(_ssl("PretrainJob"), _run("run_pretrain"), None),
    "ssl-badencoder": JobKind(_ssl("BadEncoderJob"), _run("run_badencoder_job"), "encoder"),
    "ssl-defend": JobKind(_ssl("DefendJob"), _run("run_defend"), "encoder", metrics=_ssl_defend_metrics,
                          weights=False),
}


def job_kind(name: str) -> JobKind:
    """The :class:`JobKind` called ``name``.

    Raises:
        KDGuardError: no such kind.
    """
    if name not in JOB_KINDS:
        raise unknown_name("job kind", name, JOB_KINDS)
    return JOB_KINDS[name]


# -- names a job refers to --------------------------------------------------------------------------

def check_names(kind: str, job: Any) -> None:
    """Check the registry names a job holds (attack/trigger, KD method, defence) before it runs.

    Raises:
        KDGuardError: naming the unknown name and the known ones.
    """
    from ..attacks import ATTACK_PRESETS, TRIGGERS

    attack = getattr(job, "attack", None)
    name = getattr(attack, "name", None)
    if name is not None and name not in ATTACK_PRESETS and name not in TRIGGERS:
        raise unknown_name("attack/trigger", name, set(ATTACK_PRESETS) | set(TRIGGERS.names()))
    if kind == "distill" and job.kd.method != "kd":
        from ..distill.methods import KD_METHODS

        for part in job.kd.method.split("+"):
            if part not in KD_METHODS:
                raise unknown_name("KD method", part, KD_METHODS.names())
    if kind == "defend":
        from ..defenses import DEFENSES

        if job.method not in DEFENSES:
            raise unknown_name("defence", job.method, DEFENSES.names())


# -- running one stage -------------------------------------------------------------------------------

@dataclass
class StageOutcome:
    """What running (or finding) one stage gave."""

    key: str
    ran: bool                     # False: it was already done (reused)
    wall_seconds: float


def read_stage(out: str | Path) -> dict[str, Any] | None:
    """The :data:`STAGE_FILE` record of a done stage, or None."""
    path = Path(out) / STAGE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def stage_done(out: str | Path, key: str) -> bool:
    """Whether the stage with ``key`` has finished in ``out``."""
    record = read_stage(out)
    return record is not None and record.get("key") == key


def run_stage(kind: str, overrides: list[str], out: str, key: str, threads: int) -> StageOutcome:
    """Run one stage in this process (reusing it when it is done), then mark it done.

    Args:
        kind: a :data:`JOB_KINDS` name.
        overrides: the job's ``key=value`` settings, ``out`` included.
        out: the stage's run directory.
        key: the stage's fingerprint (:func:`kdguard.suites.plan.plan_suite`).
        threads: torch's intra-op threads for the job.

    Raises:
        KDGuardError: as the job raises it.
    """
    if stage_done(out, key):
        return StageOutcome(key, False, 0.0)
    import torch

    from ..io import write_json
    from ..rundir import run_policy
    from ..runtime import cpu_name, resolve_device

    spec = job_kind(kind)
    job = spec.build(overrides)
    t0 = time.perf_counter()
    with run_policy():
        spec.run(job, threads)
    wall = time.perf_counter() - t0
    device = getattr(job, "device", None) or getattr(getattr(job, "train", None), "device", None) or "auto"
    try:
        device = str(resolve_device(device).type)
    except KDGuardError:
        device = str(device)
    write_json(Path(out) / STAGE_FILE, {
        "key": key, "kind": kind, "wall_seconds": wall, "threads": threads, "device": device,
        "machine": cpu_name(), "host": platform.node(), "torch": torch.__version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return StageOutcome(key, True, wall)
