"""``kdguard suite run|report|list|status|rescore``: experiment suites (:mod:`kdguard.suites`, docs/suites.md).

Example::

    kdguard suite run tiny --seeds 0,1 --engine ray
    kdguard suite report tiny
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import KDGuardError
from ._app import app, command

suite_app = typer.Typer(no_args_is_help=True, help="Experiment suites: grids of jobs over seeds, cached stages, "
                                                   "a results ledger and reports (docs/suites.md)")
app.add_typer(suite_app, name="suite")

SUITE = typer.Argument(..., help="A shipped suite (kdguard suite list) or a suite YAML file")
SCALE = typer.Option("cpu", "--scale", help="cpu, or a scale the suite defines (e.g. paper)")
OUT = typer.Option("runs/suites", "--out", help="Stage cache: run directories of every stage (shared by suites)")
LEDGER = typer.Option("results", "--ledger", help="Results ledger: one JSON record per finished cell and seed, "
                                                  "under LEDGER/SUITE/ (commit it)")
SEEDS = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2 (default: the suite's)")
ONLY = typer.Option(None, "--only", help="Cells to run: comma-separated fnmatch patterns of cell names "
                                         "(badnets/*, */zskt) or a name part (zskt)")


def _seeds(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise KDGuardError(f"--seeds {text!r} is not a comma-separated list of integers",
                           "write e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise KDGuardError(f"--seeds {text!r} repeats a seed", "give each seed once")
    return seeds


def _plan(suite_name: str, scale: str, seeds: Optional[str], only: Optional[str], out: str,
          threads: Optional[int] = None, gpus: Optional[float] = None):
    from ..suites import load_suite, plan_suite

    if threads is not None and threads < 1:
        raise KDGuardError(f"--threads {threads} is below 1", "give --threads 1 or more")
    if gpus is not None and gpus < 0:
        raise KDGuardError(f"--gpus-per-stage {gpus} is negative", "give e.g. --gpus-per-stage 0.25")
    return plan_suite(load_suite(suite_name), scale=scale, seeds=_seeds(seeds), only=only, out=out, threads=threads,
                      gpus=gpus)


@command("run", group=suite_app)
def run_cmd(suite: str = SUITE, scale: str = SCALE, seeds: Optional[str] = SEEDS, only: Optional[str] = ONLY,
            engine: str = typer.Option("local", "--engine", help="local (one stage after another) or ray"),
            address: Optional[str] = typer.Option(None, "--address",
                                                  help="Ray cluster address (ray://HOST:10001 or auto); "
                                                       "default: a Ray instance on this machine"),
            num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of a local Ray instance "
                                                                             "(default: all)"),
            threads: Optional[int] = typer.Option(None, "--threads",
                                                  help="torch threads of every stage (default: each stage's "
                                                       "num_cpus, at least 1)"),
            gpus: Optional[float] = typer.Option(None, "--gpus-per-stage",
                                                 help="Ray: GPUs each stage asks for (default: the suite's "
                                                      "num_gpus); a fraction such as 0.25 packs 4 stages on a GPU"),
            out: str = OUT, ledger: str = LEDGER,
            data_root: Optional[str] = typer.Option(None, "--data-root",
                                                    help="Directory holding the datasets (sets $KDGUARD_DATA_ROOT)"),
            dry_run: bool = typer.Option(False, "--dry-run", help="Check the suite and print its stages; run nothing")
            ) -> None:
    """Run a suite's cells (every stage not done yet) and record each finished cell in the ledger."""
    from ..suites import run_suite

    if data_root:
        os.environ["KDGUARD_DATA_ROOT"] = str(Path(data_root).expanduser().resolve())
    plan = _plan(suite, scale, seeds, only, out, threads, gpus)
    uses = sum(len(c.stages) for c in plan.cells)
    typer.echo(f"suite {plan.suite.name} ({scale}): {len(plan.cells)} cell runs "
                  f"({len({c.cell for c in plan.cells})} cells × {len(plan.seeds)} seeds), "
                  f"{len(plan.stages)} distinct stages for {uses} stage uses")
    if dry_run:
        for key, sp in plan.stages.items():
            typer.echo(f"  {sp.kind:<16} {sp.name:<20} {sp.out}")
        return
    result = run_suite(plan, engine=engine, ledger=ledger, address=address, num_cpus=num_cpus)
    typer.echo(f"stages: {result.ran} ran, {result.reused} reused"
                  + (f", {result.restored} teachers restored from the ledger" if result.restored else "")
                  + f"; {len(result.records)} cell records in {Path(ledger) / plan.suite.name} "
                  f"({result.seconds:.0f} s, engine {engine})")


@command("report", group=suite_app)
def report_cmd(suite: str = SUITE, scale: str = SCALE, ledger: str = LEDGER,
               out: Optional[str] = typer.Option(None, "--out", help="Folder of SUITE.md and SUITE.html "
                                                                      "(default: LEDGER/SUITE)")) -> None:
    """Write the suite's Markdown table (mean ± std over seeds, worst seed) and its HTML page."""
    from ..suites import load_suite, write_report

    loaded = load_suite(suite)
    md, page, n = write_report(loaded, ledger, out or Path(ledger) / loaded.name, scale=scale)
    typer.echo(md.read_text())
    typer.echo(f"{n} records; report: {md}, {page}")


@command("list", group=suite_app)
def list_cmd(suite: Optional[str] = typer.Argument(None, help="Print this suite's cells instead")) -> None:
    """List the shipped suites, or one suite's cells and scales."""
    from ..suites import load_suite, shipped_suites

    if suite is not None:
        loaded = load_suite(suite)
        typer.echo(f"{loaded.name}: {loaded.spec.description}")
        typer.echo(f"scales: {', '.join(loaded.scale_names)}; seeds: {','.join(map(str, loaded.spec.seeds))}")
        for name, _, _ in loaded.cells():
            typer.echo(f"  {name}")
        return
    for name in shipped_suites():
        loaded = load_suite(name)
        typer.echo(f"{name:<18} {len(loaded.cells()):>4} cells  {loaded.spec.description}")


@command("status", group=suite_app)
def status_cmd(suite: str = SUITE, scale: str = SCALE, seeds: Optional[str] = SEEDS, only: Optional[str] = ONLY,
               out: str = OUT, ledger: str = LEDGER,
               dirs: bool = typer.Option(False, "--dirs", help="Also print each stage's run directory "
                                                               "(what kdguard probe, evaluate or --fork read)")) -> None:
    """Per cell and seed: which stages are done, started or missing, and whether it is recorded."""
    from ..suites import suite_status

    plan = _plan(suite, scale, seeds, only, out)
    rows = suite_status(plan, ledger)
    for row in rows:
        stages = " ".join(f"{name}:{state}" for name, state in row["stages"].items())
        typer.echo(f"{row['cell']:<32} s{row['seed']:<3} {'recorded' if row['recorded'] else 'pending ':<9} {stages}")
        if dirs:
            for name, path in row["dirs"].items():
                typer.echo(f"    {name:<20} {path}")
    done = sum(r["recorded"] for r in rows)
    typer.echo(f"{done}/{len(rows)} cell runs recorded")


@command("rescore", group=suite_app)
def rescore_cmd(suite: str = SUITE, scale: str = SCALE, seeds: Optional[str] = SEEDS, only: Optional[str] = ONLY,
                out: str = OUT, ledger: str = LEDGER,
                data_root: Optional[str] = typer.Option(None, "--data-root",
                                                        help="Directory holding the datasets (else $KDGUARD_DATA_ROOT)")
                ) -> None:
    """Add the metrics a finished cell's run lacks (metrics added after it was recorded) by
    re-evaluating its model, checked against the counts it recorded, and record it again."""
    from ..suites import rescore_suite

    plan = _plan(suite, scale, seeds, only, out)
    rows = rescore_suite(plan, ledger, data_root=data_root)
    for row in rows:
        state = "not finished" if row["added"] is None else (
            f"added {', '.join(row['added'])}" if row["added"] else "complete")
        typer.echo(f"{row['cell']:<32} s{row['seed']:<3} {state}")
    typer.echo(f"{sum(bool(r['added']) for r in rows)} of {len(rows)} cell runs rescored; records in "
               f"{Path(ledger) / plan.suite.name}")
