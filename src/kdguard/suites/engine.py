"""Engines that run a suite's stage graph: ``local`` (this process, one stage after another in
dependency order) and ``ray`` (Ray core tasks with ``num_cpus``/``num_gpus`` resources, on this
machine or a cluster). Both run every stage through :func:`kdguard.suites.stages.run_stage`,
i.e. kdguard's job functions in the process that owns the stage, with the same threads, so they
give the same records.

After each stage, every cell whose stages are all done writes its record into the ledger, so an
interrupted suite keeps what it finished; running it again reuses every done stage and resumes
an interrupted one from its last saved state.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KDGuardError
from .ledger import build_record, restore_teachers, store_teacher, write_record
from .plan import SuitePlan
from .stages import StageOutcome, run_stage, stage_done

log = logging.getLogger("kdguard.suites")

ENGINES = ("local", "ray")


@dataclass
class SuiteRunResult:
    """What a run did: stages run and reused (done before, or shared by several cells), teachers
    restored from the ledger, records written."""

    ran: int = 0
    reused: int = 0
    restored: int = 0
    records: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class _Recorder:
    """Writes the records of cells as their last stages finish."""

    def __init__(self, plan: SuitePlan, ledger: str | Path | None, result: SuiteRunResult) -> None:
        self.plan, self.ledger, self.result = plan, ledger, result
        self.pending = list(plan.cells)
        self.stored: set[str] = set()

    def update(self) -> None:
        if self.ledger is None:
            return
        still = []
        for cell in self.pending:
            if all(stage_done(self.plan.stages[k].out, k) for k in cell.stages):
                for key in cell.stages:
                    if self.plan.stages[key].kind == "teacher" and key not in self.stored:
                        store_teacher(self.ledger, self.plan, key)
                        self.stored.add(key)
                self.result.records.append(write_record(self.ledger, build_record(self.plan, cell)))
            else:
                still.append(cell)
        self.pending = still


def _count(result: SuiteRunResult, outcome: StageOutcome, plan: SuitePlan) -> None:
    sp = plan.stages[outcome.key]
    if outcome.ran:
        result.ran += 1
        log.info("stage %s (%s) ran in %.1f s: %s", sp.name, sp.kind, outcome.wall_seconds, sp.out)
    else:
        result.reused += 1


def run_suite(plan: SuitePlan, *, engine: str = "local", ledger: str | Path | None = "results",
              address: str | None = None, num_cpus: int | None = None) -> SuiteRunResult:
    """Run every stage of ``plan`` not yet done, then record every finished cell.

    Args:
        engine: ``local`` or ``ray``.
        ledger: the ledger directory (None: write no records).
        address: Ray only: a running cluster (``ray://host:10001``, ``auto``); None starts a local
            Ray instance on this machine.
        num_cpus: Ray only, local instance: CPUs it may use (None: all).

    Raises:
        KDGuardError: an unknown engine, Ray not installed, a stage's job failing with a
            :class:`KDGuardError`, a ledger teacher that does not match.
    """
    if engine not in ENGINES:
        from ..errors import unknown_name

        raise unknown_name("engine", engine, ENGINES)
    t0 = time.perf_counter()
    result = SuiteRunResult()
    if ledger is not None:
        result.restored = restore_teachers(ledger, plan)
    recorder = _Recorder(plan, ledger, result)
    total_uses = sum(len(c.stages) for c in plan.cells)
    if engine == "local":
        _run_local(plan, result, recorder)
    else:
        _run_ray(plan, result, recorder, address=address, num_cpus=num_cpus)
    recorder.update()
    # a stage used by n cells counts once as run (or found done) and n - 1 times as reused
    result.reused += total_uses - len(plan.stages)
    result.seconds = time.perf_counter() - t0
    return result


def _run_local(plan: SuitePlan, result: SuiteRunResult, recorder: _Recorder) -> None:
    for key, sp in plan.stages.items():
        _count(result, run_stage(sp.kind, sp.overrides, sp.out, key, sp.threads), plan)
        recorder.update()


def _ray_stage(kind: str, overrides: list[str], out: str, key: str, threads: int, *parents: object) -> StageOutcome:
    """The Ray task of one stage (``parents``: the parent stages' outcomes, which order it)."""
    return run_stage(kind, overrides, out, key, threads)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise KDGuardError("the ray engine needs Ray, which is not installed",
                           "pip install 'kdguard[ray]' (or use --engine local)") from None
    return ray


def _run_ray(plan: SuitePlan, result: SuiteRunResult, recorder: _Recorder, *, address: str | None,
             num_cpus: int | None) -> None:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        # workers must import this kdguard (a source checkout on PYTHONPATH included)
        env = {k: os.environ[k] for k in ("PYTHONPATH", "KDGUARD_DATA_ROOT", "KDGUARD_CACHE") if k in os.environ}
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env} if env else None)
        started = True
    try:
        task = ray.remote(_ray_stage)
        refs, owner = {}, {}
        for key, sp in plan.stages.items():
            if stage_done(sp.out, key):
                _count(result, StageOutcome(key, False, 0.0), plan)
                continue
            deps = [refs[p] for p in sp.parents if p in refs]
            ref = task.options(num_cpus=sp.num_cpus, num_gpus=sp.num_gpus, max_retries=0,
                               name=f"{sp.name}-{key[:8]}").remote(sp.kind, sp.overrides, sp.out, key, sp.threads,
                                                                   *deps)
            refs[key] = ref
            owner[ref] = key
        waiting = list(refs.values())
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, KDGuardError):
                    raise KDGuardError(cause.problem, cause.fix) from None
                raise
            _count(result, outcome, plan)
            recorder.update()
    finally:
        if started:
            ray.shutdown()
