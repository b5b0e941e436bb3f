"""Experiment suites: a grid of kdguard jobs described in YAML, run as a cached stage graph by a
local or a Ray engine, recorded in a committable ledger and reported as tables over seeds.

==============  ===================================================================================
module          what
==============  ===================================================================================
schema          :class:`SuiteSpec` (the YAML file's schema), :func:`load_suite`, :func:`shipped_suites`
stages          :data:`JOB_KINDS` (teacher, distill, datafree, defend, robustkd, ssl-*), :func:`run_stage`
plan            :func:`plan_suite`: every cell's stages as typed jobs with fingerprints (shared stages once)
engine          :func:`run_suite` with the ``local`` or ``ray`` engine
ledger          cell records and teachers in ``<ledger>/<suite>/`` (digest-checked restore)
report          mean ± std (n) tables, worst seed, the HTML page
==============  ===================================================================================

See ``docs/suites.md``. This package sits in the jobs layer: it composes :mod:`kdguard.jobs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine import ENGINES, SuiteRunResult, run_suite
from .ledger import comparable, read_records, record_path
from .plan import CellPlan, StagePlan, SuitePlan, plan_suite
from .rescore import rescore_run, rescore_suite
from .schema import StageSpec, Suite, SuiteSpec, load_suite, shipped_suites
from .stages import JOB_KINDS, read_stage, run_stage, stage_done


def suite_status(plan: SuitePlan, ledger: str | Path | None) -> list[dict[str, Any]]:
    """Per cell and seed: ``cell``, ``seed``, ``stages`` (done / started / missing each, by name),
    ``dirs`` (each stage's run directory, by name), ``recorded`` (a ledger record exists)."""
    rows = []
    for cell in plan.cells:
        states, dirs = {}, {}
        for name, key in zip(cell.stage_names, cell.stages):
            out = Path(plan.stages[key].out)
            dirs[name] = str(out)
            states[name] = "done" if stage_done(out, key) else ("started" if out.is_dir() and any(out.iterdir())
                                                               else "missing")
        recorded = ledger is not None and record_path(ledger, plan.suite.name, plan.scale, cell.cell,
                                                      cell.seed).is_file()
        rows.append({"cell": cell.cell, "seed": cell.seed, "stages": states, "dirs": dirs, "recorded": recorded})
    return rows


def write_report(suite: Suite, ledger: str | Path, out_dir: str | Path, *, scale: str = "cpu") -> tuple[Path, Path, int]:
    """Write ``<out_dir>/<suite>.md`` and ``<out_dir>/<suite>.html`` from the ledger's records;
    returns their paths and the number of records used."""
    from ..io import write_text
    from .report import html_report, markdown_report

    records, refused = read_records(ledger, suite.name, scale)
    order = [name for name, _, _ in suite.cells()]
    recorded = {r["cell"] for r in records}
    missing = [c for c in order if c not in recorded]
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    md = write_text(out_dir / f"{suite.name}.md", markdown_report(suite.name, suite.spec.description, scale, records,
                                                                  refused, order, missing))
    page = write_text(out_dir / f"{suite.name}.html",
                      html_report(suite.name, suite.spec.description, scale, records, refused, order,
                                  suite.spec.group_by, missing))
    return md, page, len(records)


__all__ = [
    "CellPlan", "ENGINES", "JOB_KINDS", "StagePlan", "StageSpec", "Suite", "SuitePlan", "SuiteRunResult", "SuiteSpec",
    "comparable", "load_suite", "plan_suite", "read_records", "read_stage", "record_path", "rescore_run",
    "rescore_suite", "run_stage", "run_suite",
    "shipped_suites", "stage_done", "suite_status", "write_report",
]
