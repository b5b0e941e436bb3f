"""The anomaly index over per-class trigger sizes (median absolute deviation).

Neural Cleanse (Wang et al., S&P 2019, §IV-C "Detecting backdoor") calls a class infected when
its reverse-engineered trigger is abnormally *small*: with sizes ``s_1 … s_K`` (here the L1 norm
of each class's mask), ``m = median(s)`` and ``MAD = median(|s_k − m|)``, the anomaly index of
class ``k`` is::

    index_k = (m − s_k) / (1.4826 · MAD)

1.4826 is the consistency constant that makes ``1.4826 · MAD`` estimate the standard deviation of
normally distributed sizes (Hampel 1974), so an index above 2 is a two-sigma outlier (the paper's
threshold, ≈ 95 % confidence). Only the small side counts: a class with a *large* trigger is hard
to reach, not infected, so its index is negative and never flagged. The paper reports the absolute
deviation of the flagged class; kdguard keeps the sign instead, which says the same thing and
keeps large outliers apart.

``MAD = 0`` (at least half of the sizes are equal to the median, e.g. all sizes equal): the
index is 0 for sizes equal to the median, ``+inf`` for smaller ones and ``−inf`` for larger
ones; all sizes equal therefore flags nothing, while a single smaller size among identical
others is flagged (it lies infinitely many spreads below the rest). The paper does not cover
this case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import KDGuardError

#: ``1.4826 · MAD`` estimates σ for normal data (1 / Φ⁻¹(3/4)).
MAD_CONSISTENCY = 1.4826
#: Neural Cleanse's threshold on the anomaly index (§IV-C).
DEFAULT_THRESHOLD = 2.0


def _as_sizes(sizes: Sequence[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(sizes, dtype=torch.float64).flatten()
    if t.numel() < 2:
        raise KDGuardError(f"the anomaly index needs the sizes of at least 2 classes, got {t.numel()}",
                           "audit a model with 2 or more classes")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise KDGuardError(f"trigger sizes must be finite and non-negative, got {t.tolist()}",
                           "pass mask L1 norms (or another non-negative size) per class")
    return t


def _median(t: torch.Tensor) -> float:
    # the usual median (mean of the two middle values for an even count); torch.median
    # returns the lower middle value instead
    s = torch.sort(t).values
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def anomaly_index(sizes: Sequence[float] | torch.Tensor, *, min_spread: float = 0.0) -> list[float]:
    """The signed MAD anomaly index of every class (positive = smaller than typical).

    Args:
        sizes: ``K ≥ 2`` finite non-negative per-class trigger sizes (any unit, e.g. mask L1 norm
            in pixels), index = class.
        min_spread: a floor on the spread ``1.4826 · MAD`` in the sizes' unit (default 0: the
            plain index). Sizes measured on a grid (a bisection's resolution, a share of a few
            hundred images) tie often, and ties make ``MAD`` 0 and every other size infinitely
            anomalous; a floor of the grid's step keeps one step from counting as an outlier.

    Returns:
        ``K`` floats ``(median − size_k) / (1.4826 · MAD)``; with ``MAD = 0``: 0, ``+inf`` or
        ``−inf`` (size equal to, below or above the median; see the module docstring).

    Raises:
        KDGuardError: fewer than 2 sizes, a size that is negative, NaN or infinite, or a bad
            ``min_spread``.
    """
    t = _as_sizes(sizes)
    if not (math.isfinite(min_spread) and min_spread >= 0):
        raise KDGuardError(f"min_spread {min_spread!r} must be a finite number >= 0", "give 0 or the sizes' grid step")
    med = _median(t)
    mad = _median((t - med).abs())
    spread = max(MAD_CONSISTENCY * mad, min_spread)
    if spread == 0.0:
        return [0.0 if v == med else (math.inf if v < med else -math.inf) for v in t.tolist()]
    return [(med - v) / spread for v in t.tolist()]


def flagged_classes(sizes: Sequence[float] | torch.Tensor,
                    threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """Classes whose anomaly index exceeds ``threshold`` (strictly), most anomalous first.

    Args:
        sizes: as for :func:`anomaly_index`.
        threshold: index above which a class is flagged (> 0; Neural Cleanse: 2).

    Raises:
        KDGuardError: bad sizes (see :func:`anomaly_index`) or ``threshold <= 0``.
    """
    if not threshold > 0:
        raise KDGuardError(f"anomaly threshold {threshold!r} must be positive",
                           "use the standard 2 or another positive number")
    index = anomaly_index(sizes)
    hits = [k for k, v in enumerate(index) if v > threshold]
    return sorted(hits, key=lambda k: -index[k])
