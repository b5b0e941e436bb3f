"""The audit's verdict from per-class anomaly indices.

Every class ``k`` gets up to three signed MAD anomaly indices (:func:`kdguard.audit.anomaly.anomaly_index`,
positive = more backdoor-like than the typical class):

* ``mask``: Neural Cleanse's index of the reverse-engineered mask size ``|m_k|₁`` (small side);
* ``additive``: the same index of the smallest universal L∞ budget ``ε_k`` that reaches ``k``
  (small side): a full-image trigger (blend, SIG, WaNet) makes its target reachable by a small
  dense change even when no small *patch* reaches it, where Neural Cleanse's mask struggles;
* ``smooth`` (opt-in): the same index for a smooth δ (bilinear from a coarse control grid): natural
  classes need much larger smooth changes than dense ones (their universal adversarial
  perturbations are fine texture), a sinusoid or low-frequency trigger does not;
* ``shuffle``: not an index but a share: how many of the other classes' clean images the
  shuffled ensembles send to ``k`` (:mod:`.shuffle_check`). A backdoor's shortcut survives
  channel shuffling while the clean features break, so a shuffled backdoored model sends almost
  everything to the target; a shuffled clean model spreads its errors over a few natural classes.
  Its signal is a share above ``ShuffleCheck.collapse`` (passed as ``signals``).

A class is a *signal* for an index above ``threshold`` (Neural Cleanse's 2). The verdict:

* ``backdoored``: some class carries at least ``votes`` signals (default 2, of 3 checks, or 4
  with the opt-in smooth search); the suspected targets are those classes, most signals first,
  then the largest index;
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
SIGNALS = ("mask", "additive", "smooth", "shuffle")


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
           votes: int = 2, signals: Mapping[str, Sequence[bool]] | None = None) -> Verdict:
    """The verdict from per-class anomaly indices (see the module docstring).

    Args:
        indices: index name → ``K`` signed anomaly indices (``±inf`` allowed); names from
            :data:`SIGNALS` (a subset is fine, e.g. without the shuffle check).
        threshold: an index strictly above it is a signal (> 0).
        votes: signals a class needs for ``backdoored`` (``1 ≤ votes ≤ len(indices)``).
        signals: per index name, ``K`` booleans that replace the threshold test for that index
            (the shuffle collapse is a share with its own bound, not an anomaly index).

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
    given = dict(signals or {})
    if set(given) - set(indices) or any(len(v) != k_count for v in given.values()):
        raise KDGuardError("signals must name given indices, one boolean per class", "pass K booleans per index")

    def fires(name: str, k: int) -> bool:
        return bool(given[name][k]) if name in given else indices[name][k] > threshold

    found = {k: [name for name in SIGNALS if name in indices and fires(name, k)] for k in range(k_count)}
    found = {k: s for k, s in found.items() if s}
    if not found:
        return Verdict(CLEAN, [], {})

    def strength(k: int) -> tuple[int, float]:
        scores = [indices[name][k] for name in found[k] if name not in given]
        return (len(found[k]), max(scores) if scores else 0.0)

    strong = [k for k, s in found.items() if len(s) >= votes]
    verdict = BACKDOORED if strong else SUSPICIOUS
    targets = sorted(strong or found, key=strength, reverse=True)
    return Verdict(verdict, targets, found)
