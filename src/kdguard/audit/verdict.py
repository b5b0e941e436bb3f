"""The audit's verdict from three per-class anomaly indices.

Every class ``k`` gets three signed MAD anomaly indices (:func:`kdguard.audit.anomaly.anomaly_index`,
positive = more backdoor-like than the typical class):

* ``mask``: Neural Cleanse's index of the reverse-engineered mask size ``|m_k|₁`` (small side);
* ``additive``: the same index of the smallest universal L∞ budget ``ε_k`` that reaches ``k``
  (small side): a full-image trigger (blend, SIG, WaNet) makes its target reachable by a small
  dense change even when no small *patch* reaches it, where Neural Cleanse's mask struggles;
* ``shuffle``: the index of the shuffle agreement of ``k``'s stamped images (large side, see
  :mod:`.shuffle_check`): a backdoor's shortcut survives channel shuffling, an adversarial or
  natural-feature trigger does not.

A class is a *signal* for an index above ``threshold`` (Neural Cleanse's 2). The verdict:

* ``backdoored``: some class carries at least ``votes`` signals (default 2 of 3); the suspected
  targets are those classes, most signals first, then the largest index;
* ``suspicious``: some class carries a signal, none carries ``votes``; the suspected targets are
  the classes with a signal;
* ``clean``: no class carries a signal.

Requiring two independent signals for ``backdoored`` is kdguard's rule: each index alone flags
natural classes of clean models now and then (Neural Cleanse's MAD test does so on few, similar
classes), while a planted shortcut shows on more than one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import KDGuardError
from .anomaly import DEFAULT_THRESHOLD

CLEAN, SUSPICIOUS, BACKDOORED = "clean", "suspicious", "backdoored"
SIGNALS = ("mask", "additive", "shuffle")


@dataclass(frozen=True)
class Verdict:
    """The audit's conclusion.

    Attributes:
        verdict: ``"clean"``, ``"suspicious"`` or ``"backdoored"``.
        targets: suspected target classes, most suspicious first (empty when clean).
        signals: per class, the names of the indices above the threshold (classes without any
            are left out).
    """

    verdict: str
    targets: list[int]
    signals: dict[int, list[str]]


def decide(indices: Mapping[str, Sequence[float]], *, threshold: float = DEFAULT_THRESHOLD,
           votes: int = 2) -> Verdict:
    """The verdict from per-class anomaly indices (see the module docstring).

    Args:
        indices: index name → ``K`` signed anomaly indices (``±inf`` allowed); names from
            :data:`SIGNALS` (a subset is fine, e.g. without the shuffle check).
        threshold: an index strictly above it is a signal (> 0).
        votes: signals a class needs for ``backdoored`` (``1 ≤ votes ≤ len(indices)``).

    Raises:
        KDGuardError: no indices, unknown names, lists of different lengths, a non-positive
            threshold or ``votes`` out of range.
    """
    if not indices:
        raise KDGuardError("the verdict needs at least one anomaly index", "pass mask sizes at least")
    unknown = sorted(set(indices) - set(SIGNALS))
    if unknown:
        raise KDGuardError(f"unknown anomaly index {unknown[0]!r}", f"use {', '.join(SIGNALS)}")
    lengths = {len(v) for v in indices.values()}
    if len(lengths) != 1:
        raise KDGuardError("anomaly indices of different lengths", "give one value per class for each index")
    if not threshold > 0:
        raise KDGuardError(f"anomaly threshold {threshold!r} must be positive", "use the standard 2")
    if not 1 <= votes <= len(indices):
        raise KDGuardError(f"votes {votes!r} is outside [1, {len(indices)}]",
                           f"give a number of signals between 1 and {len(indices)}")
    k_count = lengths.pop()
    signals = {k: [name for name in SIGNALS if name in indices and indices[name][k] > threshold]
               for k in range(k_count)}
    signals = {k: s for k, s in signals.items() if s}
    if not signals:
        return Verdict(CLEAN, [], {})

    def strength(k: int) -> tuple[int, float]:
        return (len(signals[k]), max(indices[name][k] for name in signals[k]))

    strong = [k for k, s in signals.items() if len(s) >= votes]
    verdict = BACKDOORED if strong else SUSPICIOUS
    targets = sorted(strong or signals, key=strength, reverse=True)
    return Verdict(verdict, targets, signals)
