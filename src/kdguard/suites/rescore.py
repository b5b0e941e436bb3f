"""Metrics added after a ledger record was made: re-evaluate a finished stage's model, add the keys
its ``metrics.json`` lacks, and record the cell again (``kdguard suite rescore``).

The re-evaluation is checked against what the run recorded: the counts it shares with the
stored metrics (clean hits, backdoor hits, their denominators) must come out the same, else the
run is left as it was and the disagreement is reported. Only classifier runs whose
``metrics.json`` holds :class:`kdguard.metrics.BackdoorMetrics` counts are rescored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import KDGuardError
from ..metrics import BackdoorMetrics
from .plan import SuitePlan
from .stages import stage_done

#: the counts a re-evaluation must reproduce before anything is added
CHECKED = ("n_clean", "clean_correct", "n_backdoor", "backdoor_hits", "robust_correct")


def rescore_run(run_dir: str | Path, *, data_root: str | None = None) -> list[str]:
    """Add the :class:`~kdguard.metrics.BackdoorMetrics` keys ``run_dir``'s ``metrics.json``
    lacks, from one evaluation of its model on its dataset's test split under its manifest's
    attack (read as data). Returns the keys added (empty: nothing was missing, or the run's
    metrics are not a classifier's).

    Raises:
        KDGuardError: the model or dataset cannot be loaded, or the re-evaluation disagrees with
            a count the run recorded (nothing is written then).
    """
    from ..checkpoint import read_manifest
    from ..config import DataConfig, TrainConfig
    from ..io import read_json, write_json
    from ..jobs.supervised import evaluate_checkpoint

    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    stored: dict[str, Any] = read_json(path) if path.exists() else {}
    if "clean_correct" not in stored:
        return []
    missing = [f.name for f in dataclasses.fields(BackdoorMetrics) if f.name not in stored]
    if not missing:
        return []
    dataset = (read_manifest(run_dir).get("dataset") or {}).get("name")
    if dataset is None:
        raise KDGuardError(f"{run_dir}: the manifest names no dataset", "give a kdguard run directory")
    # the run's model, its dataset's test split and the attack its manifest records (read as data)
    fresh = evaluate_checkpoint(run_dir, DataConfig(name=dataset, root=data_root),
                                train_cfg=TrainConfig(device="cpu"))
    for key in CHECKED:
        if key in stored and stored[key] != fresh[key]:
            raise KDGuardError(f"{run_dir}: re-evaluated {key} {fresh[key]} differs from the recorded "
                               f"{stored[key]}; nothing was added",
                               "rescore on the dataset files the run was evaluated on (--data-root)")
    stored.update({key: fresh[key] for key in missing})
    write_json(path, stored)
    return missing


def rescore_suite(plan: SuitePlan, ledger: str | Path, *, data_root: str | None = None) -> list[dict[str, Any]]:
    """:func:`rescore_run` on the method stage of every cell whose stages are all done, then its
    record written again (:func:`kdguard.suites.ledger.write_record`). Returns per cell run
    ``{"cell", "seed", "added"}``, ``added`` None when the cell is not finished."""
    from .ledger import build_record, write_record

    rows = []
    for cell in plan.cells:
        if not all(stage_done(plan.stage_dir(k), k) for k in cell.stages):
            rows.append({"cell": cell.cell, "seed": cell.seed, "added": None})
            continue
        added = rescore_run(plan.stage_dir(cell.stages[-1]), data_root=data_root)
        write_record(ledger, build_record(plan, cell))
        rows.append({"cell": cell.cell, "seed": cell.seed, "added": added})
    return rows
