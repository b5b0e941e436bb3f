"""What the CLI front and its command modules share: the typer ``app``, the :func:`command`
decorator, the common options and small helpers.

:mod:`kdguard.cli` and every module of :mod:`kdguard.commands` import this module, never each
other's commands, so the fronts form no import circle.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Optional, TypeVar

import typer
from rich.console import Console

from ..errors import KDGuardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation from teachers that may be backdoored.")
console = Console()
F = TypeVar("F", bound=Callable)


@app.callback()
def global_options(
        quiet: bool = typer.Option(False, "--quiet", "-q",
                                   help="Print no progress lines or bars: results, warnings and errors only"),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="Also print debug lines (learning rates, interval losses)")) -> None:
    """Options before the command (``kdguard --quiet train-teacher ...``): how much progress to print.

    Progress lines go to stderr through :mod:`logging` (:mod:`kdguard.log`); stdout keeps the
    results. Bars are drawn only on a terminal.
    """
    import logging

    from ..log import configure_logging

    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other; give one of them")
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


RUN_DIR_OPTIONS = {
    "resume": typer.Option(False, "--resume", help="Continue the run in out= although its settings differ: "
                                                   "only a longer training (train.epochs, schedule.rounds)"),
    "overwrite": typer.Option(False, "--overwrite", help="Remove what out= holds and start the run over"),
}


def command(name: str, *, group: typer.Typer | None = None, distributed: bool = False) -> Callable[[F], F]:
    """Register a CLI command whose :class:`KDGuardError` becomes ``error: …`` and exit code 2.

    ``group``: a sub-command group (``kdguard suite run``) added to :data:`app` by its module;
    None registers a top-level command.

    Every command also gets ``--resume`` and ``--overwrite`` and runs inside
    :func:`kdguard.rundir.run_policy`, which decides what happens to an ``out=`` that holds
    another run (commands that write no run directory ignore them).

    ``distributed``: the command may be started by ``torchrun --nproc_per_node N`` (its job trains
    data-parallel, :mod:`kdguard.distributed`); other commands refuse to. Under torchrun only
    rank 0 prints: the other processes print no progress, warnings, results or ``error:`` lines
    (they check the same settings; their exit code still tells a failure).
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args, resume: bool = False, overwrite: bool = False, **kwargs):
            from .. import distributed as ddp
            from ..rundir import run_policy

            main = ddp.is_main()
            try:
                with contextlib.ExitStack() as stack:
                    if not main:
                        _silence(stack)
                    if not distributed:
                        ddp.refuse(f"`kdguard {name}`")
                    with run_policy(resume=resume, overwrite=overwrite):
                        return fn(*args, **kwargs)
            except KDGuardError as e:
                if main:
                    print(f"error: {e}", file=sys.stderr)
                raise typer.Exit(2) from None
            finally:
                ddp.shutdown()

        sig = inspect.signature(fn, eval_str=True)
        extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v, annotation=bool)
                 for k, v in RUN_DIR_OPTIONS.items()]
        guarded.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
        guarded.__annotations__ = {**getattr(fn, "__annotations__", {}), **{k: bool for k in RUN_DIR_OPTIONS}}
        (group or app).command(name)(guarded)
        return fn

    return deco


def _silence(stack: contextlib.ExitStack) -> None:
    """No progress lines, bars, warnings or printed results in this process (a torchrun rank > 0)."""
    import io
    import logging
    import warnings

    from ..log import configure_logging

    configure_logging(logging.CRITICAL)
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))


OVERRIDES = typer.Argument(None, help="Config overrides as key=value, e.g. train.epochs=30 model=resnet20")
CONFIG = typer.Option(None, "--config", "-c", help="YAML config file")
DATA_ROOT = typer.Option(None, "--data-root", help="Directory holding the datasets (sets data.root)")
TEACHER_ARCH = typer.Option(
    None, "--teacher-arch", "--arch",
    help="Architecture of a bare weights file: a registry name (kdguard list), wrn-D-K, or "
         "pkg.module:factory from your own code (sets teacher_spec.arch; never read from a file)")
NUM_CLASSES = typer.Option(None, "--num-classes", help="Classes of a bare weights file's model "
                                                       "(sets teacher_spec.num_classes)")
IN_CHANNELS = typer.Option(None, "--in-channels", help="Input channels of a bare weights file's model, 1 or 3 "
                                                       "(sets teacher_spec.in_channels)")
INPUT_NORM = typer.Option(
    None, "--teacher-input-norm", "--input-norm",
    help="For a model that expects normalised tensors: MEAN/STD (e.g. 0.4914,0.4822,0.4465/0.247,0.2435,0.2616) "
         "or imagenet|cifar10|half; kdguard feeds it (x-mean)/std of [0,1] images (sets teacher_spec.input_norm)")


def teacher_spec_overrides(arch: Optional[str], num_classes: Optional[int], in_channels: Optional[int],
                           input_norm: Optional[str]) -> list[str]:
    """``teacher_spec.*=`` overrides for the bare-weights options that were given."""
    return with_overrides(None, **{"teacher_spec.arch": arch, "teacher_spec.num_classes": num_classes,
                                   "teacher_spec.in_channels": in_channels, "teacher_spec.input_norm": input_norm})


def with_overrides(items: Optional[list[str]], **extra: Optional[str]) -> list[str]:
    """``items`` plus ``key=value`` for each ``extra`` that was given (not None)."""
    out = list(items or [])
    out += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return out


def print_metrics(metrics: dict) -> None:
    """One line: CA, ASR with its no-trigger rate beside it, ASR-all, RA (in %)."""
    labels = {"ca": "CA", "asr": "ASR", "asr_no_trigger": "no-trigger", "asr_all": "ASR_ALL", "ra": "RA"}
    console.print("  ".join(f"{label}={100 * metrics[k]:.2f}%" for k, label in labels.items()
                            if metrics.get(k) is not None))
