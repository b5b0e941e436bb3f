"""The ``kdguard`` command line: a thin front over :mod:`kdguard.jobs`.

Every command takes an optional YAML ``--config`` and dotted ``key=value`` overrides. Problems
with the input print one line ``error: …`` on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .commands._app import (CONFIG, DATA_ROOT, IN_CHANNELS, INPUT_NORM, NUM_CLASSES, OVERRIDES, TEACHER_ARCH, app,
                            command, console, print_metrics, teacher_spec_overrides, with_overrides)
from .errors import KDGuardError


@command("train-teacher", distributed=True)
def train_teacher_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                      data_root: Optional[str] = DATA_ROOT) -> None:
    """Train a teacher, clean or poisoned by an attack (default: BadNets 10 % on embedded MNIST)."""
    from .config import TeacherJob, build_config
    from .jobs import train_teacher

    job = build_config(TeacherJob, config, with_overrides(overrides, **{"data.root": data_root}))
    result = train_teacher(job)
    print_metrics(result.metrics)
    console.print(f"run directory: {result.run_dir}")


@command("distill", distributed=True)
def distill_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[Path] = CONFIG,
                teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint (sets teacher=)"),
                method: Optional[str] = typer.Option(
                    None, "--method", help="KD method (kd, at, ofd, ...) or a data-free one (zskt, dfad, dafl, "
                                           "deepinv, cmi, ood)"),
                data_root: Optional[str] = DATA_ROOT, teacher_arch: Optional[str] = TEACHER_ARCH,
                num_classes: Optional[int] = NUM_CLASSES, in_channels: Optional[int] = IN_CHANNELS,
                teacher_input_norm: Optional[str] = INPUT_NORM) -> None:
    """Distil a student from a teacher checkpoint: on clean data, or data-free (--method zskt ...)."""
    from .commands.datafree import datafree_method_requested, distill_datafree_from_cli
    from .config import DistillJob, build_config
    from .jobs import distill

    overrides = [*(overrides or []),
                 *teacher_spec_overrides(teacher_arch, num_classes, in_channels, teacher_input_norm)]
    if datafree_method_requested(overrides, method):
        distill_datafree_from_cli(overrides, config, teacher=teacher, method=method, data_root=data_root)
        return
    if method:
        overrides = [*overrides, f"kd.method={method}"]
    job = build_config(DistillJob, config, with_overrides(overrides, teacher=teacher, **{"data.root": data_root}))
    result = distill(job)
    print_metrics(result.metrics)
    console.print(f"run directory: {result.run_dir}")


@command("evaluate")
def evaluate_cmd(
    checkpoint: str = typer.Argument(..., help="Run directory or weights file"),
    dataset: Optional[str] = typer.Option(None, help="Dataset (default: the checkpoint's)"),
    data_root: Optional[str] = DATA_ROOT,
    attack: Optional[str] = typer.Option(
        None, help="Attack/trigger (default: the checkpoint's; 'none' for CA only), or pkg.mod:fn, your own "
                   "function of float N×C×H×W images in [0, 1]"),
    attack_params: Optional[list[str]] = typer.Option(
        None, "--attack-param", help="Trigger parameter key=value (repeatable; values read as YAML, e.g. "
                                     "pattern_file=trigger.png position=[24,24] alpha=0.5); applies to "
                                     "--attack, --attack-from or the checkpoint's own attack"),
    target: int = typer.Option(0, help="Target class when --attack is given"),
    poison_seed: int = typer.Option(0, "--attack-seed", help="Trigger seed when --attack is given"),
    attack_from: Optional[str] = typer.Option(
        None, help="Use the attack (trigger, target, parameters) of another run, e.g. a clean model "
                   "tested against a poisoned teacher's trigger"),
    from_audit: Optional[str] = typer.Option(
        None, "--from-audit", help="Test against the trigger an audit reconstructed (a `kdguard audit` run "
                                   "directory; its first suspected target unless --audit-class)"),
    audit_class: Optional[int] = typer.Option(None, "--audit-class",
                                              help="With --from-audit: use this class's reconstructed trigger"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics object as JSON"),
    arch: Optional[str] = TEACHER_ARCH, num_classes: Optional[int] = NUM_CLASSES,
    in_channels: Optional[int] = IN_CHANNELS, input_norm: Optional[str] = INPUT_NORM,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    bf16: bool = typer.Option(False, "--bf16", help="Evaluate under bf16 autocast (default fp32)"),
) -> None:
    """Evaluate a checkpoint: CA, ASR (non-target), ASR-all, RA and counts."""
    from .checkpoint import read_manifest
    from .config import AttackConfig, DataConfig, TeacherSpec, TrainConfig
    from .attacks import attack_from_manifest
    from .jobs import evaluate_checkpoint

    if sum(bool(a) for a in (attack, attack_from, from_audit)) > 1:
        raise KDGuardError("more than one of --attack, --attack-from and --from-audit names an attack",
                           "give only one of them")
    if audit_class is not None and not from_audit:
        raise KDGuardError("--audit-class is given without --from-audit", "add --from-audit AUDIT_DIR")

    data_cfg = None
    if dataset or data_root:
        name = dataset or read_manifest(checkpoint).get("dataset", {}).get("name")
        if not name:
            raise KDGuardError("the checkpoint's manifest names no dataset", "pass --dataset NAME")
        data_cfg = DataConfig(name=name, root=data_root)
    attack_cfg = AttackConfig(name=attack, target=target, seed=poison_seed) if attack else None
    if attack_from:
        attack_cfg = attack_from_manifest(read_manifest(attack_from), source=f"run {attack_from!r}")
        if attack_cfg is None:
            raise KDGuardError(f"run {attack_from!r} records no attack", "point --attack-from at a poisoned run")
    if from_audit:
        from .jobs.audit import audit_trigger

        attack_cfg = audit_trigger(from_audit, audit_class)
    if attack_params:
        if attack_cfg is None:
            attack_cfg = attack_from_manifest(read_manifest(checkpoint), source=f"checkpoint {checkpoint!r}")
            if attack_cfg is None:
                raise KDGuardError(f"--attack-param is given but checkpoint {checkpoint!r} records no attack",
                                   "name the trigger with --attack NAME (or --attack-from RUN)")
        attack_cfg.params = _trigger_params(attack_cfg.params, attack_params)
    metrics = evaluate_checkpoint(checkpoint, data_cfg, attack_cfg,
                                  use_manifest_attack=not (attack or attack_from or from_audit or attack_params),
                                  train_cfg=TrainConfig(device=device, amp="on" if bf16 else "off"),
                                  spec=TeacherSpec(arch=arch, num_classes=num_classes,
                                                   in_channels=in_channels, input_norm=input_norm))
    if as_json:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    else:
        print_metrics(metrics)


def _trigger_params(params: dict, items: list[str]) -> dict:
    """``params`` updated with ``key=value`` items (values parsed as YAML, as config overrides are).

    A new ``X_file`` drops a recorded ``X_sha256`` (unless given too): the digest fingerprints the
    old file.
    """
    import re

    from .config import AttackConfig, build_config

    for item in items:
        key = item.partition("=")[0].strip()
        if "=" not in item or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise KDGuardError(f"--attack-param {item!r} is not of the form key=value",
                               "write e.g. --attack-param alpha=0.5")
        if "${" in item:
            raise KDGuardError(f"--attack-param {item!r} holds an interpolation (${{...}}), which kdguard "
                               "does not resolve", "write the value itself, e.g. --attack-param alpha=0.5")
    given = build_config(AttackConfig, None, [f"params.{item.strip()}" for item in items]).params
    out = {k: v for k, v in dict(params).items()
           if not (k.endswith("_sha256") and f"{k[:-len('_sha256')]}_file" in given and k not in given)}
    return {**out, **given}


@command("demo")
def demo_cmd(out: Optional[Path] = typer.Option(None, help="Run directory (default runs/demo-<time>)"),
             ledger: Path = typer.Option(Path("results"), "--ledger",
                                         help="Results ledger holding the abd-demo-seeds suite: the ABD row's "
                                              "spread over seeds is read from it")) -> None:
    """The main job: poisoned teacher → distilled student → CA/ASR table and report."""
    from .jobs.demo import run_demo
    from .suites.report import seeds_sentence

    run_demo(out, console=console, seed_spread=seeds_sentence(ledger, "abd-demo-seeds",
                                                              {"badnets/zskt": "ZSKT", "badnets/zskt_abd": "ZSKT + ABD",
                                                               "badnets/sr_conv": "ZSKT + SR confined to the "
                                                                                  "convolutions (abd.sr.modules)"}))


@command("list")
def list_cmd() -> None:
    """List registered datasets, attacks, triggers, models, KD methods and defences."""
    from .attacks import ATTACK_PRESETS, TRIGGERS
    from .data import DATASETS
    from .models import MODELS

    sections = {"datasets": DATASETS.names(), "attacks (presets)": sorted(ATTACK_PRESETS),
                "triggers": TRIGGERS.names(), "models": MODELS.names()}
    try:
        from .distill.methods import KD_METHODS
        sections["KD methods"] = KD_METHODS.names()
    except ImportError:  # pragma: no cover - ships with kdguard
        sections["KD methods"] = ["kd"]
    from .datafree import DATAFREE_METHODS
    from .defenses import DEFENSES
    sections["data-free KD methods"] = DATAFREE_METHODS.names()
    sections["defences"] = DEFENSES.names()
    for title, names in sections.items():
        console.print(f"[bold]{title}[/]: {', '.join(names)}")


def _load_command_modules() -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{info.name}")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    _load_command_modules()
    group = typer.main.get_command(app)
    try:
        # not standalone: click's usage errors reach us instead of printing a multi-line box
        result = group.main(args=argv, prog_name="kdguard", standalone_mode=False)
    except typer.TyperException as e:  # unknown option or command, missing or malformed argument
        return _usage_error(e)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _usage_error(e: "typer.TyperException") -> int:
    """Print a click usage error as one ``error: …`` line naming the help to read; exit code 2."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None and type(e).__name__ == "NoArgsIsHelpError":  # bare `kdguard`: typer printed the help
        return 0
    message = " ".join(e.format_message().split())
    where = ctx.command_path if ctx is not None else "kdguard"
    print(f"error: {message} (see `{where} --help`)", file=sys.stderr)
    return 2


def run() -> None:
    """Console-script entry: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
