"""Checks of a job's training settings before its run directory is opened.

Every job (teacher, distillation, defences, RobustKD, data-free, SSL) holds one or more
:class:`~kdguard.config.TrainConfig` sections and device settings. :func:`check_job` finds them by
walking the job's dataclass tree and checks each under its own dotted key (``train.optim.lr``,
``defense.finetune.epochs``, ``probe.device``), so a bad value is reported before any directory,
data or model is touched, with the key to change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import TrainConfig
from ..errors import KDGuardError
from ..optim import OPTIMIZERS, SCHEDULES
from ..runtime import _switch, resolve_device


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise KDGuardError(f"{key}={value!r} {rule}", f"set e.g. {key}={example}")


def check_train_config(cfg: TrainConfig, key: str = "train") -> None:
    """Check one :class:`TrainConfig` given under the dotted ``key`` (e.g. ``"train"``).

    Checks: ``epochs``, ``batch_size``, ``eval_batch_size`` ≥ 1; optimiser ``sgd``/``adam`` with
    lr in (0, 10], weight decay ≥ 0 (SGD: momentum in [0, 1), Nesterov only with momentum; Adam:
    two betas in [0, 1)); the optimiser's own ``grad_clip`` unset (epoch loops take ``grad_clip``);
    schedule ``cosine``/``multistep``/``constant`` with milestones (fractions of training) in
    [0, 1] and gamma > 0; ``warmup_epochs`` ≥ 0; ``grad_clip`` null or > 0; ``amp`` and
    ``channels_last`` auto/on/off; ``device`` a device this machine has.

    Raises:
        KDGuardError: naming the first bad setting by its full key and a valid value.
    """
    for name, example in (("epochs", "10"), ("batch_size", "128"), ("eval_batch_size", "512")):
        value = getattr(cfg, name)
        _require(isinstance(value, int) and value >= 1, f"{key}.{name}", value, "must be an integer >= 1", example)
    o, ok = cfg.optim, f"{key}.optim"
    _require(o.name in OPTIMIZERS, f"{ok}.name", o.name, f"is not one of {', '.join(OPTIMIZERS)}", "sgd")
    _require(_number(o.lr) and 0 < o.lr <= 10, f"{ok}.lr", o.lr, "is outside (0, 10]", "0.1")
    if o.name == "sgd":  # adam ignores momentum and nesterov
        _require(_number(o.momentum) and 0 <= o.momentum < 1, f"{ok}.momentum", o.momentum,
                 "is outside [0, 1)", "0.9")
        if o.nesterov and o.momentum == 0:
            raise KDGuardError(f"{ok}.nesterov=true needs momentum, but {ok}.momentum=0",
                               f"set {ok}.momentum=0.9 or {ok}.nesterov=false")
    if o.name == "adam":
        betas = list(o.betas)
        _require(len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas), f"{ok}.betas", betas,
                 "must be two values in [0, 1)", "[0.9,0.999]")
    if o.grad_clip is not None:
        raise KDGuardError(f"{ok}.grad_clip={o.grad_clip!r}: a training loop clips with {key}.grad_clip",
                           f"set {key}.grad_clip={o.grad_clip} instead")
    _require(_number(o.weight_decay) and o.weight_decay >= 0, f"{ok}.weight_decay", o.weight_decay,
             "must be >= 0", "5e-4")
    _require(o.schedule in SCHEDULES, f"{ok}.schedule", o.schedule, f"is not one of {', '.join(SCHEDULES)}",
             "cosine")
    milestones = list(o.milestones)
    _require(all(_number(m) and 0 <= m <= 1 for m in milestones), f"{ok}.milestones", milestones,
             "must be fractions of training in [0, 1]", "[0.5,0.75]")
    _require(_number(o.gamma) and o.gamma > 0, f"{ok}.gamma", o.gamma, "must be > 0", "0.1")
    _require(_number(o.warmup_epochs) and o.warmup_epochs >= 0, f"{ok}.warmup_epochs", o.warmup_epochs,
             "must be >= 0", "0")
    _require(cfg.grad_clip is None or (_number(cfg.grad_clip) and cfg.grad_clip > 0), f"{key}.grad_clip",
             cfg.grad_clip, "must be > 0 (or null for no clipping)", "5")
    for name in ("amp", "channels_last"):
        try:
            _switch(name, getattr(cfg, name))
        except KDGuardError:
            raise KDGuardError(f"{key}.{name}={getattr(cfg, name)!r} is not auto, on or off",
                               f"set {key}.{name}=auto") from None


def check_job(job: Any) -> None:
    """Check every :class:`TrainConfig` section and every ``device`` setting of a job dataclass.

    A section with a ``check_settings(key)`` method (e.g. the SSL ``augment`` section) is also
    asked to check itself under its dotted key.

    Raises:
        KDGuardError: see :func:`check_train_config`; an unknown device, or CUDA on a machine
            without it (the fix names the job's key, e.g. ``probe.device``).
    """
    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, TrainConfig):
            check_train_config(obj, prefix)
            resolve_device(obj.device, setting=f"{prefix}.device")
            return
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return
        own_check = getattr(obj, "check_settings", None)
        if callable(own_check):
            own_check(prefix)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            path = f"{prefix}.{f.name}" if prefix else f.name
            if f.name == "device" and isinstance(value, str):
                resolve_device(value, setting=path)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    walk(item, path)
            else:
                walk(value, path)

    walk(job, "")
