"""``kdguard audit``: look for a backdoor in a teacher before distilling it.

Example::

    kdguard audit --teacher runs/teacher --data-root ../shared/data out=runs/audit
    kdguard audit --teacher their.safetensors --teacher-arch resnet20 --num-classes 10 \\
        data.name=cifar10 --data-root ../shared/data out=runs/their-audit

See :mod:`kdguard.jobs.audit` for what the run directory holds and :mod:`kdguard.audit` for the checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, OVERRIDES, TEACHER_ARCH, command,
                   console, teacher_spec_overrides, with_overrides)


@command("audit")
def audit_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
              teacher: Optional[str] = typer.Option(None, "--teacher",
                                                    help="Teacher run directory or weights file (sets teacher=)"),
              data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
              num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
              teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Audit a teacher: per-class trigger reachability, shuffle test, verdict and the reconstructed trigger."""
    from ..config import build_config
    from ..jobs.audit import AuditJob, run_audit

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    job = build_config(AuditJob, config, with_overrides(overrides, teacher=teacher, **{"data.root": data_root}))
    result = run_audit(job)
    r = result.record
    targets = ", ".join(map(str, r["suspected_targets"])) or "none"
    console.print(f"verdict: {r['verdict']}  suspected target(s): {targets}  "
                  f"({r['seconds']['total']:.0f} s, {r['n_images']} clean images)")
    console.print(f"run directory: {result.run_dir}")


@command("audit-summary")
def audit_summary_cmd(audits: list[Path] = typer.Argument(..., help="`kdguard audit` run directories")) -> None:
    """One Markdown table over several audits: verdicts against the teachers' recorded attacks, Neural Cleanse's own decision, wall time."""
    import json

    from ..audit.report import summary_table
    from ..errors import KDGuardError

    records = []
    for d in audits:
        try:
            record = json.loads((d / "audit.json").read_text())
            if not isinstance(record, dict) or "classes" not in record or "verdict" not in record:
                raise ValueError("not an audit record")
        except (OSError, ValueError) as e:
            raise KDGuardError(f"cannot read the audit in {str(d)!r} ({type(e).__name__})",
                               "pass `kdguard audit` run directories (each holds audit.json)") from None
        records.append(record)
    console.print(summary_table(records), markup=False, soft_wrap=True)
