"""``kdguard defend``: run a data-available defence (ft, fp, nad) on a poisoned run directory.

Example::

    kdguard defend --model runs/teacher method=nad clean_fraction=0.05 train.epochs=20 out=runs/nad

Configuration: :class:`kdguard.defenses.DefenseJob` (YAML ``--config`` + ``key=value``
overrides); the dataset and attack default to those in the model's manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import KDGuardError
from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, OVERRIDES, TEACHER_ARCH, with_overrides,
                   print_metrics, command, console, teacher_spec_overrides)


@command("defend")
def defend_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
               model: Optional[str] = typer.Option(None, "--model", "--teacher",
                                                   help="Poisoned run directory or weights file (sets model=)"),
               data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
               num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
               teacher_input_norm: Optional[str] = INPUT_NORM,
               from_audit: Optional[str] = typer.Option(
                   None, "--from-audit", help="method=unlearn: unlearn the trigger a `kdguard audit` run "
                                              "reconstructed (its first suspected target unless --audit-class)"),
               audit_class: Optional[int] = typer.Option(
                   None, "--audit-class", help="With --from-audit: unlearn this class's reconstructed trigger")) -> None:
    """Defend a poisoned model with clean data: method=ft (fine-tuning), fp (fine-pruning), nad, or unlearn
    (a reconstructed trigger, --from-audit)."""
    from ..config import build_config
    from ..defenses import DefenseJob
    from ..jobs.defend import run_defense

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    job = build_config(DefenseJob, config, with_overrides(overrides, model=model, **{"data.root": data_root}))
    if audit_class is not None and not from_audit:
        raise KDGuardError("--audit-class is given without --from-audit", "add --from-audit AUDIT_DIR")
    if from_audit:
        from ..jobs.audit import audit_trigger

        if job.method != "unlearn":
            raise KDGuardError(f"--from-audit feeds method=unlearn, not method={job.method}",
                               "add method=unlearn")
        job.unlearn.trigger = audit_trigger(from_audit, audit_class)
    result = run_defense(job)
    print_metrics(result.metrics)
    console.print(f"run directory: {result.run_dir}")
