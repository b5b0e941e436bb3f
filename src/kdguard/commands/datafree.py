"""``kdguard distill-datafree``: data-free distillation of a teacher checkpoint (ZSKT, CMI, OOD, ...).

Examples::

    kdguard distill-datafree --teacher runs/teacher --method zskt
    kdguard distill-datafree teacher=runs/teacher method=cmi preset=paper schedule.rounds=50
    kdguard distill-datafree -c my_run.yaml --data-root ../shared/data

Routing from ``kdguard distill`` (owned by :mod:`kdguard.cli`): :func:`datafree_method_requested`
recognises a data-free method given as ``--method NAME`` or as the override ``kd.method=NAME``,
and :func:`distill_datafree_from_cli` runs it with the remaining overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, TEACHER_ARCH, command, console,
                   teacher_spec_overrides)

OVERRIDES = typer.Argument(None, help="Config overrides as key=value, e.g. schedule.rounds=500 "
                                      "zskt.at_beta=0 student=resnet8 (see docs/datafree.md)")
METHOD = typer.Option(None, "--method", help="zskt | dfad | dafl | deepinv | cmi | ood (sets method=)")
PRESET = typer.Option(None, "--preset", help="cpu | paper | none (sets preset=)")
TEACHER = typer.Option(None, "--teacher", help="Teacher checkpoint (sets teacher=)")


def datafree_method_requested(overrides: Optional[list[str]], method: Optional[str] = None) -> Optional[str]:
    """The data-free method named by ``method`` or a ``kd.method=``/``method=`` override, else None.

    ``kdguard distill`` can call this to decide whether to hand the run to
    :func:`distill_datafree_from_cli` (only the data-free names count; ``kd``, ``at``, ... do not).
    """
    from ..datafree.config import METHOD_NAMES

    names = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key.strip() in ("kd.method", "method"):
            names.append(value.strip())
    if method:
        names.append(method)  # an option wins over overrides, as in kdguard.cli
    last = names[-1].lower() if names else ""
    return last if last in METHOD_NAMES else None


def translate_overrides(overrides: Optional[list[str]]) -> list[str]:
    """Map ``kdguard distill`` spellings onto the data-free job: ``kd.method=X`` → ``method=X``."""
    out = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        out.append(f"method={value}" if sep and key.strip() == "kd.method" else item)
    return out


def _fork_job(run: str, items: list[str], given: dict[str, object]):
    """The job continuing a copy of the stopped run ``run`` with ``items`` on top (``--fork``)."""
    from ..errors import KDGuardError
    from ..jobs.datafree import fork_datafree_run, stopped_run_config

    named = [flag for flag, value in given.items() if value is not None]
    if named:
        raise KDGuardError(f"--fork continues {run} with its own settings; {', '.join(named)} do not apply",
                           "drop them and give only the settings that change, as key=value")
    stopped_run_config(run)
    outs = [i.split("=", 1)[1] for i in items if i.split("=", 1)[0].strip() == "out"]
    if not outs:
        raise KDGuardError("--fork needs out=DIR, the fork's own run directory", "add out=runs/my_fork")
    out = Path(outs[-1]).expanduser()
    if out.resolve() == Path(run).expanduser().resolve():
        raise KDGuardError(f"out={outs[-1]} is the run being forked", "give the fork a new directory")
    if out.exists() and any(out.iterdir()):
        raise KDGuardError(f"out={outs[-1]} exists and is not empty (a fork starts from a fresh copy)",
                           "give the fork a new directory, or remove that one")
    return fork_datafree_run(run, out, [i for i in items if i.split("=", 1)[0].strip() != "out"])


def distill_datafree_from_cli(overrides: Optional[list[str]] = None, config: Optional[Path] = None, *,
                              teacher: Optional[str] = None, method: Optional[str] = None,
                              preset: Optional[str] = None, data_root: Optional[str] = None,
                              fork: Optional[str] = None) -> dict:
    """Build the data-free job from CLI inputs, run it, print CA/ASR and return the metrics.

    ``fork``: a stopped data-free run (``schedule.stop_after``) to continue in a copy at ``out=``
    with its own settings and ``overrides`` on top (e.g. ``abd.mode=sr schedule.stop_after=null``);
    the run itself is left as it is.

    Raises:
        KDGuardError: any configuration or run problem (the CLI turns it into ``error: ...``).
    """
    from ..jobs.datafree import build_datafree_job, continue_fork, run_datafree

    items = translate_overrides(overrides)
    if data_root is not None:
        items.append(f"data.root={data_root}")
    if fork is not None:
        job = _fork_job(fork, items, {"--teacher": teacher, "--method": method, "--preset": preset,
                                      "--config": config})
    else:
        for key, value in (("teacher", teacher), ("method", method), ("preset", preset)):
            if value is not None:
                items.append(f"{key}={value}")
        job = build_datafree_job(config, items)
    result = run_datafree(job) if fork is None else continue_fork(job, fork)
    m = result.metrics
    console.print("  ".join(f"{k.upper()}={100 * m[k]:.2f}%" for k in ("ca", "asr", "asr_all", "ra")
                            if m.get(k) is not None))
    console.print(f"run directory: {result.run_dir}")
    return m


@command("distill-datafree")
def distill_datafree_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                         teacher: Optional[str] = TEACHER, method: Optional[str] = METHOD,
                         preset: Optional[str] = PRESET, data_root: Optional[str] = DATA_ROOT,
                         teacher_arch: Optional[str] = TEACHER_ARCH, num_classes: Optional[int] = NUM_CLASSES,
                         in_channels: Optional[int] = IN_CHANNELS,
                         teacher_input_norm: Optional[str] = INPUT_NORM,
                         fork: Optional[str] = typer.Option(
                             None, "--fork", help="Continue a copy of this stopped run (schedule.stop_after) "
                                                  "at out=DIR with its settings and the key=value ones on top"),
                         from_audit: Optional[str] = typer.Option(
                             None, "--from-audit", help="A `kdguard audit` run directory: SR (abd.mode=sr|full) "
                                                        "unlearns its reconstructed trigger instead of searching one"),
                         audit_class: Optional[int] = typer.Option(
                             None, "--audit-class", help="With --from-audit: the class whose trigger "
                                                         "(default: the audit's first suspected target)")) -> None:
    """Distil a teacher without training data (ZSKT, DFAD, DAFL, DeepInversion, CMI, OOD proxy data)."""
    from ..errors import KDGuardError

    if audit_class is not None and from_audit is None:
        raise KDGuardError("--audit-class needs --from-audit", "add --from-audit AUDIT_DIR")
    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm),
                 *([f"abd.sr.from_audit={from_audit}"] if from_audit is not None else []),
                 *([f"abd.sr.audit_class={audit_class}"] if audit_class is not None else [])]
    distill_datafree_from_cli(overrides, config, teacher=teacher, method=method, preset=preset,
                              data_root=data_root, fork=fork)
