"""``kdguard robustkd`` and ``kdguard robustkd-trigger``: RobustKD jobs from the command line.

``robustkd`` detoxifies a teacher and distils a student (:class:`RobustKDJob`); ``robustkd-trigger``
learns the reference's optimised blended trigger on a clean teacher (:class:`TriggerJob`). Both
take a YAML ``--config`` and dotted ``key=value`` overrides, e.g.::

    kdguard robustkd --teacher runs/teacher pair=cpu_resnet detox.epochs=10 train.epochs=30

Importing this module registers the ``robustkd_blend`` trigger, so
``kdguard train-teacher attack.name=robustkd_blend attack.params.file=.../trigger.safetensors``
works from the command line too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, OVERRIDES, TEACHER_ARCH, command,
                   console, teacher_spec_overrides)
from ..defenses.robustkd import trigger_opt  # noqa: F401  (registers the robustkd_blend trigger)


def _with(items: Optional[list[str]], **extra: Optional[str]) -> list[str]:
    return list(items or []) + [f"{k}={v}" for k, v in extra.items() if v is not None]


def _pct(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "—" if value is None else f"{100 * value:.2f}%"


@command("robustkd")
def robustkd_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                 teacher: Optional[str] = typer.Option(None, "--teacher",
                                                       help="Teacher run directory or weights file (sets teacher=)"),
                 data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
                 num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
                 teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """RobustKD: detoxify a (possibly backdoored) teacher's features, then distil a student with OFD."""
    from ..config import build_config
    from ..defenses.robustkd import RobustKDJob
    from ..jobs.robustkd import run_robustkd

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    job = build_config(RobustKDJob, config, _with(overrides, teacher=teacher, **{"data.root": data_root}))
    result = run_robustkd(job)
    m = result.metrics
    if job.detox.only:
        console.print(f"detoxified teacher: CA={_pct(m, 'ca')}  ASR={_pct(m, 'asr')}  "
                      f"(detox {m.get('detox_seconds') or 0:.1f} s, no student: detox.only=true)")
    else:
        console.print(f"student: CA={_pct(m, 'ca')}  ASR={_pct(m, 'asr')}  "
                      f"(detox {m.get('detox_seconds') or 0:.1f} s, distillation {m['distill_seconds']:.1f} s)")
    console.print(f"run directory: {result.run_dir}")


@command("robustkd-trigger")
def robustkd_trigger_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                         teacher: Optional[str] = typer.Option(
                             None, "--teacher", help="CLEAN teacher run directory or weights file (sets teacher=)"),
                         data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
                         num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
                         teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Learn RobustKD's optimised blended trigger (pattern + mask ≤ 0.2) on a clean teacher."""
    from ..config import build_config
    from ..defenses.robustkd import TriggerJob
    from ..jobs.robustkd import run_trigger_job

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    job = build_config(TriggerJob, config, _with(overrides, teacher=teacher, **{"data.root": data_root}))
    path, trigger = run_trigger_job(job)
    console.print(f"trigger: {path} (mask mean {float(trigger.blend_mask.mean()):.3f}, "
                  f"max {float(trigger.blend_mask.max()):.3f})")
    console.print(f"poison a teacher with: kdguard train-teacher attack.name=robustkd_blend "
                  f"attack.params.file={path}")
