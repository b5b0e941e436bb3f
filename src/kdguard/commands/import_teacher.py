"""``kdguard import-teacher``: a bare weights file (a teacher kdguard did not train) into a run directory.

Example::

    kdguard import-teacher --teacher resnet_cifar.safetensors --teacher-arch mypkg.nets:ResNet \
        --num-classes 10 --teacher-input-norm cifar10 data.name=cifar10 --data-root ../shared/data \
        out=runs/their-teacher

See :mod:`kdguard.jobs.import_teacher`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, OVERRIDES, TEACHER_ARCH, with_overrides,
                   print_metrics, command, console, teacher_spec_overrides)


@command("import-teacher")
def import_teacher_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                       teacher: Optional[str] = typer.Option(None, "--teacher",
                                                             help="Weights file (.safetensors/.pt/.pth) (sets teacher=)"),
                       data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
                       num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
                       teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Turn a teacher's bare weights file into a kdguard run directory (weights digest, source, metrics)."""
    from ..config import build_config
    from ..jobs.import_teacher import ImportJob, import_teacher

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    job = build_config(ImportJob, config, with_overrides(overrides, teacher=teacher, **{"data.root": data_root}))
    result = import_teacher(job)
    if result.metrics is not None:
        print_metrics(result.metrics)
    console.print(f"sha256 {result.manifest['imported']['sha256']}")
    console.print(f"run directory: {result.run_dir}")
