"""One optimiser and one learning-rate schedule for every training loop.

Every optimiser of kdguard (``train.optim``, data-free ``student_optim``/``generator_optim``)
is described by one :class:`~kdguard.config.OptimConfig` and built by :func:`build_optimizer`.
Its learning rate follows :func:`schedule_factor` of the training progress ``p`` ∈ [0, 1]:

* ``cosine``: ½(1 + cos πp) (Loshchilov & Hutter, ICLR 2017, without restarts; the value
  ``CosineAnnealingLR(T_max=total)`` has after ``p·total`` steps);
* ``multistep``: γᵏ after the k-th milestone (milestones are fractions of training);
* ``constant``: 1.

A loop drives the schedule through :func:`lr_scheduler`, a :class:`torch.optim.lr_scheduler.LambdaLR`
whose factor at step ``s`` is computed by the loop (its progress, warm-up and extensions), so
``lr = base_lr · factor(s)`` is one float product wherever it is evaluated. A run lengthened on
resume stretches the rest of its schedule (:func:`schedule_progress`, :func:`extend_schedule`)
instead of jumping back up.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig
from .errors import KDGuardError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "constant")


def build_optimizer(params: Iterable[torch.Tensor] | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam (``betas``) with weight decay, at ``cfg.lr``.

    Args:
        params: tensors, or param-group dicts (CMI optimises a generator and its inputs together).
        cfg: the optimiser settings (``name``, ``lr``, ``momentum``, ``nesterov``, ``betas``,
            ``weight_decay``); Nesterov is used only with a non-zero momentum.

    Raises:
        KDGuardError: unknown optimiser name or a learning rate that is not > 0.
    """
    if not cfg.lr > 0:
        raise KDGuardError(f"learning rate {cfg.lr!r} must be > 0", "give a positive lr")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])),
                                weight_decay=cfg.weight_decay)
    raise KDGuardError(f"unknown optimizer {cfg.name!r}", f"use one of: {', '.join(OPTIMIZERS)}")


def cosine_factor(progress: float) -> float:
    """½(1 + cos πp) at ``progress`` ``p`` (not clamped)."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_factor(cfg: OptimConfig, progress: float) -> float:
    """Learning-rate multiplier of ``cfg.schedule`` at ``progress`` (clamped to [0, 1]).

    Raises:
        KDGuardError: unknown schedule name.
    """
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return cosine_factor(p)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(p >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return 1.0
    raise KDGuardError(f"unknown schedule {cfg.schedule!r}", f"use one of: {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, progress: float) -> float:
    """Set every param group's lr to ``cfg.lr · schedule_factor(cfg, progress)``; return it.

    For optimisers that live for one round only (a synthesizer's per-round inversion) or whose
    position is given from outside as a progress value; loops use :func:`lr_scheduler`.
    """
    lr = cfg.lr * schedule_factor(cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def lr_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, factor: Callable[[int], float], *,
                 start: int = 0) -> LambdaLR:
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` setting every group's lr to
    ``base_lr · factor(step)``, positioned at ``step = start`` (its ``last_epoch``).

    Call ``scheduler.step()`` after each ``optimizer.step()`` to move to the next step. ``start``
    places a resumed loop where it stopped (``scheduler.state_dict()["last_epoch"]`` of the saved
    state); ``factor`` should be a plain function or lambda so the state dict stays plain data.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr  # LambdaLR's base, also when it starts past step 0
    return LambdaLR(optimizer, factor, last_epoch=start - 1)


def advance(scheduler: LambdaLR) -> float:
    """``scheduler.step()``, returning the new learning rate. A loop whose step made no optimiser
    update (a data-free round without student steps) still moves on, without PyTorch's warning
    about a scheduler stepped before its optimiser."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
    return current_lr(scheduler)


def current_lr(scheduler: LambdaLR) -> float:
    """The learning rate the scheduler set last (of its first param group)."""
    return float(scheduler.get_last_lr()[0])


def schedule_progress(step: int, total: int, segments: Sequence[Mapping[str, float]] = (),
                      steps_per_epoch: int = 1) -> float:
    """Where global ``step`` lies on the learning-rate schedule of a run of ``total`` steps, in [0, 1].

    Without extensions this is ``step / total``. A run lengthened on resume carries one segment
    per extension, ``{"epoch": e, "progress": p_e}`` (``p_e``: the position the schedule had
    reached at the first step of epoch ``e``, under the length planned before). From that step
    ``s = e · steps_per_epoch`` on, the rest of the schedule is stretched over the new remaining
    steps: ``p = p_e + (1 − p_e)(step − s)/(total − s)``. The learning rate so continues from where
    it was and reaches the schedule's end at the new total: a cosine never rises again, and a run
    extended after its cosine had ended (``p_e = 1``) trains the added epochs at factor 0.
    """
    progress = step / max(total, 1)
    for seg in segments:
        start = int(seg["epoch"]) * steps_per_epoch
        if step >= start:
            p0 = float(seg["progress"])
            progress = p0 + (1.0 - p0) * (step - start) / max(total - start, 1)
    return progress


def extend_schedule(segments: list[dict[str, float]], *, done_epochs: int, planned_epochs: int,
                    steps_per_epoch: int = 1) -> list[dict[str, float]]:
    """``segments`` plus the extension of a run planned for ``planned_epochs`` that resumes, after
    ``done_epochs``, with a longer length (see :func:`schedule_progress`)."""
    p = schedule_progress(done_epochs * steps_per_epoch, planned_epochs * steps_per_epoch, segments,
                          steps_per_epoch)
    return [*segments, {"epoch": int(done_epochs), "progress": min(max(p, 0.0), 1.0)}]


def epoch_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int, steps_per_epoch: int,
                    start_epoch: int = 0, segments: Sequence[Mapping[str, float]] = (),
                    saved: Mapping[str, object] | None = None, what: str = "the run") -> LambdaLR:
    """The :func:`lr_scheduler` of an epoch loop (:func:`epoch_factor`), at the first step of
    ``start_epoch``.

    Args:
        saved: the ``state_dict()`` of the scheduler a resumed run saved (``None``/empty: none).

    Raises:
        KDGuardError: ``saved`` stands at another step than ``start_epoch · steps_per_epoch`` (a
            training state that does not belong to this data or batch size).
    """
    start = start_epoch * steps_per_epoch
    if saved and int(saved.get("last_epoch", start)) != start:  # type: ignore[call-overload]
        raise KDGuardError(f"the training state of {what} is inconsistent (its learning-rate schedule is at "
                           f"step {saved['last_epoch']}, epoch {start_epoch} × {steps_per_epoch} steps = {start})",
                           "delete train_state.pt to restart the run from scratch")
    factor = epoch_factor(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, segments=segments)
    return lr_scheduler(optimizer, cfg.lr, factor, start=start)


def epoch_factor(cfg: OptimConfig, *, epochs: int, steps_per_epoch: int,
                 segments: Sequence[Mapping[str, float]] = ()) -> Callable[[int], float]:
    """The factor at global step ``s`` of an epoch loop of ``epochs × steps_per_epoch`` steps:
    :func:`schedule_factor` at :func:`schedule_progress`, times a linear warm-up
    ``(s + 1)/(warmup_epochs · steps_per_epoch)`` over the first ``warmup_epochs``."""
    total = epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    segs = [dict(s) for s in segments]

    def factor(step: int) -> float:
        f = schedule_factor(cfg, schedule_progress(step, total, segs, steps_per_epoch))
        if warm > 0 and step < warm:
            f *= (step + 1) / warm
        return f

    return factor
