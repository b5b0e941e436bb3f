"""The data-available defence job: ``kdguard defend --model RUN_DIR method=ft|fp|nad``."""

from __future__ import annotations

from ..defenses import DEFENSES, DefenseJob
from ..runs import RunResult


def run_defense(job: DefenseJob, *, threads: int | None = None) -> RunResult:
    """Run the defence named by ``job.method`` on the poisoned model ``job.model``.

    Returns the :class:`kdguard.runs.RunResult` of the defended model (run directory
    ``job.out`` with ``metrics.json``, ``manifest.json`` (role ``"defense"``),
    ``model.safetensors`` and ``report.md``).

    Args:
        job: the defence job (:class:`kdguard.defenses.DefenseJob`).
        threads: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: unknown method, or any input problem the defence finds.
    """
    return DEFENSES.get(job.method).run(job, threads=threads)


__all__ = ["run_defense"]
