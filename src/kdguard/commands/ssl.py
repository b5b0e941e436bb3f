"""CLI commands of the poisoned-encoder track: ``ssl-pretrain``, ``badencoder``, ``ssl-probe``,
``ssl-defend`` and ``ssl-grid``.

Each takes an optional YAML ``--config`` and dotted ``key=value`` overrides of its typed job
(:mod:`kdguard.ssl.config`); lists are given in brackets (``datasets=[cifar10,gtsrb]``). Runs are
resumable: a finished stage is reused, an interrupted one continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, OVERRIDES, TEACHER_ARCH, with_overrides, command,
                   console, teacher_spec_overrides)

ENCODER = typer.Option(None, "--encoder", help="SSL encoder checkpoint directory (sets encoder=)")


@command("ssl-pretrain", distributed=True)
def ssl_pretrain_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                     data_root: Optional[str] = DATA_ROOT) -> None:
    """Pre-train a clean image encoder with SimCLR (default: ResNet-18 on CIFAR-10)."""
    from ..config import build_config
    from ..ssl.config import PretrainJob
    from ..jobs.ssl import run_pretrain

    job = build_config(PretrainJob, config, with_overrides(overrides, **{"data.root": data_root}))
    result = run_pretrain(job)
    m = result.metrics
    knn = f"  kNN acc={100 * m['knn_acc']:.2f}%" if m.get("knn_acc") is not None else ""
    console.print(f"SimCLR loss={m.get('loss')}{knn}")
    console.print(f"run directory: {result.run_dir}")


@command("badencoder")
def badencoder_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                   encoder: Optional[str] = ENCODER, data_root: Optional[str] = DATA_ROOT,
                   teacher_arch: Optional[str] = TEACHER_ARCH, in_channels: Optional[int] = IN_CHANNELS,
                   teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Backdoor a clean encoder with BadEncoder (Jia et al., S&P 2022)."""
    from ..config import build_config
    from ..ssl.config import BadEncoderJob
    from ..jobs.ssl import run_badencoder_job

    overrides = [*(overrides or []), *teacher_spec_overrides(teacher_arch, None, in_channels, teacher_input_norm)]
    job = build_config(BadEncoderJob, config,
                       with_overrides(overrides, encoder=encoder, **{"shadow.root": data_root}))
    result = run_badencoder_job(job)
    console.print("  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k in ("l0", "l1", "l2")))
    console.print(f"run directory: {result.run_dir}")


@command("ssl-probe")
def ssl_probe_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                  encoder: Optional[str] = ENCODER, data_root: Optional[str] = DATA_ROOT,
                   teacher_arch: Optional[str] = TEACHER_ARCH, in_channels: Optional[int] = IN_CHANNELS,
                   teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Downstream CA / ASR / ASR-all of an encoder through a probe trained on frozen features."""
    from ..config import build_config
    from ..ssl.config import ProbeJob
    from ..jobs.ssl import run_probe_job
    from ..ssl.downstream import probe_table

    overrides = [*(overrides or []), *teacher_spec_overrides(teacher_arch, None, in_channels, teacher_input_norm)]
    job = build_config(ProbeJob, config, with_overrides(overrides, encoder=encoder, root=data_root))
    result = run_probe_job(job)
    console.print(probe_table([(Path(job.encoder).name, result.metrics["results"])], list(job.datasets)))
    console.print(f"run directory: {result.run_dir}")


@command("ssl-defend")
def ssl_defend_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                   encoder: Optional[str] = ENCODER, data_root: Optional[str] = DATA_ROOT,
                   teacher_arch: Optional[str] = TEACHER_ARCH, in_channels: Optional[int] = IN_CHANNELS,
                   teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Distil a poisoned encoder into a student (one teacher / student / loss) and probe it."""
    from ..config import build_config
    from ..ssl.config import DefendJob
    from ..jobs.ssl import run_defend

    overrides = [*(overrides or []), *teacher_spec_overrides(teacher_arch, None, in_channels, teacher_input_norm)]
    job = build_config(DefendJob, config, with_overrides(overrides, encoder=encoder, **{"data.root": data_root}))
    result = run_defend(job)
    console.print(result.table)
    console.print(f"run directory: {result.run_dir}")


@command("ssl-grid")
def ssl_grid_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                 encoder: Optional[str] = ENCODER, data_root: Optional[str] = DATA_ROOT,
                   teacher_arch: Optional[str] = TEACHER_ARCH, in_channels: Optional[int] = IN_CHANNELS,
                   teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Run the teachers × students × losses study (or a subset) and write one table."""
    from ..config import build_config
    from ..ssl.config import GridJob
    from ..jobs.ssl import run_grid

    overrides = [*(overrides or []), *teacher_spec_overrides(teacher_arch, None, in_channels, teacher_input_norm)]
    job = build_config(GridJob, config, with_overrides(overrides, encoder=encoder, **{"data.root": data_root}))
    result = run_grid(job)
    console.print(result.table)
    console.print(f"run directory: {result.run_dir}")
