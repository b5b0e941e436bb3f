"""Input checks and small shape helpers shared by the loss functions.

Every check raises :class:`kdguard.errors.KDGuardError` with a one-line message naming the bad
shape, so a wiring mistake (wrong tap, wrong batch) never surfaces as a deep torch error.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.nn.functional as F

from ..errors import KDGuardError

FnT = TypeVar("FnT", bound=Callable)


def full_precision(fn: FnT) -> FnT:
    """Run a loss with autocast disabled on its inputs' device.

    Under ``torch.autocast`` a matmul runs in bf16/fp16 even on float32 inputs. The relational
    losses (SP, RKD, PKT, CC, NST, CRD scores) compare small differences between Gram or distance
    matrices, and in bf16 their values change by O(1) (PKT on a ResNet pair: 0.72 → 2.45), so
    every loss here computes in float32: autocast is switched off and inputs are upcast inside.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if first is not None and first.device.type in ("cuda", "cpu", "xpu", "mps", "hpu"):
            ctx = torch.autocast(device_type=first.device.type, enabled=False)
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_dims(name: str, t: torch.Tensor, dims: Iterable[int]) -> None:
    """Raise unless ``t.dim()`` is one of ``dims``."""
    dims = tuple(dims)
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise KDGuardError(f"{name} has shape {shape_of(t)}, expected a {want} tensor",
                           "tap a module whose output has the layout this loss expects")


def check_same_batch(a: torch.Tensor, b: torch.Tensor, what: str = "student and teacher features") -> None:
    """Raise unless both tensors have the same (non-zero) batch size."""
    if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0] or a.shape[0] == 0:
        raise KDGuardError(f"{what} have shapes {shape_of(a)} and {shape_of(b)} with different or "
                           "empty batch dimensions", "pass features computed on the same batch")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str = "student and teacher features",
                     fix: str = "add a connector that maps the student features to the teacher's shape"
                     ) -> None:
    if a.shape != b.shape:
        raise KDGuardError(f"{what} have different shapes {shape_of(a)} and {shape_of(b)}", fix)


def check_min_batch(t: torch.Tensor, n: int, loss: str) -> None:
    if t.shape[0] < n:
        raise KDGuardError(f"{loss} needs a batch of at least {n} samples, got {t.shape[0]}",
                           f"use batch_size >= {n}")


def match_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two ``N×C×H×W`` maps to the smaller spatial size.

    Each spatial dimension is pooled independently to ``min`` of the two sizes (mdistiller's AT/NST
    rule, which pools whichever map is larger). Maps of equal size are returned unchanged.
    """
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def check_reduction(reduction: str, allowed: tuple[str, ...]) -> None:
    if reduction not in allowed:
        raise KDGuardError(f"unknown reduction {reduction!r}", f"use one of: {', '.join(allowed)}")


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an ``N`` vector of per-sample losses: ``mean`` (over the batch), ``sum`` or ``none``."""
    if reduction in ("mean", "batchmean"):
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
