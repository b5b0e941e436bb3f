"""Optimisers and per-round learning-rate schedules built from :class:`OptimSettings`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import KDGuardError
from .config import OptimSettings


def build_optimizer(params: Iterable[torch.Tensor] | list[dict], settings: OptimSettings) -> torch.optim.Optimizer:
    """Adam (with ``betas``) or SGD (momentum, Nesterov) with weight decay, at ``settings.lr``.

    ``params`` may be tensors or param-group dicts (CMI optimises the generator and ``z``
    together).

    Raises:
        KDGuardError: unknown optimiser name or a non-positive learning rate.
    """
    if settings.lr <= 0:
        raise KDGuardError(f"learning rate {settings.lr!r} must be > 0", "give a positive lr")
    if settings.name == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=tuple(settings.betas),  # type: ignore[arg-type]
                                weight_decay=settings.weight_decay)
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay,
                               nesterov=settings.nesterov and settings.momentum > 0)
    raise KDGuardError(f"unknown optimizer {settings.name!r}", "use adam or sgd")


def schedule_factor(settings: OptimSettings, progress: float) -> float:
    """Learning-rate multiplier at ``progress = round / rounds`` ∈ [0, 1].

    ``cosine``: ½(1 + cos πp), the value ``CosineAnnealingLR(T_max=rounds)`` has after
    ``round`` scheduler steps (ZSKT, CMI); ``multistep``: γ^(number of milestones ≤ p);
    ``constant``: 1.
    """
    p = min(max(progress, 0.0), 1.0)
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if settings.schedule == "multistep":
        return settings.gamma ** sum(p >= m for m in settings.milestones)
    if settings.schedule == "constant":
        return 1.0
    raise KDGuardError(f"unknown schedule {settings.schedule!r}", "use cosine, multistep or constant")


def set_lr(optimizer: torch.optim.Optimizer, settings: OptimSettings, progress: float) -> float:
    """Set every param group's lr to ``settings.lr × schedule_factor``; return that lr."""
    lr = settings.lr * schedule_factor(settings, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
