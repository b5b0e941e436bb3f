"""Which classes the teacher answers on the synthetic images: a label-free health check of synthesis.

Data-free KD only teaches the student the classes its synthetic images elicit from the teacher.
When nearly every synthetic image gets the same answer, the student learns a constant. A
backdoor can cause this: a teacher whose trigger looks like noise (Blend with a random pattern,
a dense watermark) may answer the target class on any noise-like image, and a generator that
starts from noise then only ever sees that answer. kdguard's CPU-scale Blend teacher answers the
target class on 100 % of uniform-noise images at probability ≈ 1, and its ZSKT run stays there
(``docs/datafree-results.md`` §1, measured by ``kdguard probe synthetic``). The generator's KL(teacher ‖ student) is then ≈ 0 with a vanishing
gradient, so nothing pulls the synthesis out.

The check needs neither labels nor test data, so it works in the data-free setting itself. The
dominant class of a collapsed run is a likely backdoor target class. It is evidence, not proof:
a generator can also collapse without a backdoor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..errors import KDGuardError


class SynthesisCollapseWarning(UserWarning):
    """The teacher answered one class on nearly all synthetic images of a log interval."""


class ClassShareMonitor:
    """Counts the teacher's top-1 classes on the synthetic batches the student trains on (each
    distinct batch once, however many student steps reuse it), per log interval.

    Counting stays on the device (no synchronisation per step). :meth:`summary` reads and resets
    the counts.

    Args:
        collapse_share: a share in (0, 1]. An interval whose dominant class takes more than this
            share of the answers is a collapse. 1 never counts as one.

    Raises:
        KDGuardError: ``collapse_share`` outside (0, 1] (a ``ValueError``).
    """

    def __init__(self, collapse_share: float = 0.9) -> None:
        if not 0.0 < float(collapse_share) <= 1.0:
            raise KDGuardError(f"collapse_share={collapse_share} is outside (0, 1]",
                               "give a share such as 0.9 (1 disables the check)")
        self.collapse_share = float(collapse_share)
        self._counts: torch.Tensor | None = None
        self.warned = False

    def update(self, teacher_logits: torch.Tensor) -> None:
        """Add one batch of teacher logits, shape (N, K) (any dtype)."""
        if teacher_logits.ndim != 2 or teacher_logits.shape[0] == 0:
            return
        counts = torch.bincount(teacher_logits.argmax(dim=1), minlength=teacher_logits.shape[1])
        self._counts = counts if self._counts is None else self._counts.to(counts.device) + counts

    def summary(self) -> dict[str, Any]:
        """The interval's statistics; resets the counts. ``{}`` when nothing was counted.

        Returns:
            ``{"top_class": int, "top_share": float in [0, 1], "class_entropy": float in [0, 1]
            (entropy of the class shares divided by log K: 1 = uniform, 0 = a single class),
            "images": int, "collapsed": bool}``.
        """
        if self._counts is None:
            return {}
        counts = self._counts.double().cpu()
        self._counts = None
        total = float(counts.sum())
        if total == 0:
            return {}
        shares = counts / total
        nz = shares[shares > 0]
        k = len(counts)
        entropy = float(-(nz * nz.log()).sum()) / math.log(k) if k > 1 else 0.0
        top_share, top_class = shares.max(dim=0)
        collapsed = float(top_share) > self.collapse_share
        return {"top_class": int(top_class), "top_share": float(top_share),
                "class_entropy": max(0.0, min(1.0, entropy)), "images": int(total), "collapsed": collapsed}

    def warn_once(self, summary: dict[str, Any], first_round: int, last_round: int) -> str | None:
        """Issue one :class:`SynthesisCollapseWarning` per run for a collapsed interval; return its
        message (None when the interval did not collapse or a warning was already issued)."""
        if not summary.get("collapsed") or self.warned:
            return None
        self.warned = True
        c, share = summary["top_class"], summary["top_share"]
        message = (f"the teacher answered class {c} on {100 * share:.1f} % of the synthetic images of rounds "
                   f"{first_round}-{last_round}: synthesis has collapsed onto one class and the student learns "
                   f"little else. A backdoor whose trigger looks like noise does this, so class {c} is a likely "
                   "target class; see docs/datafree.md §5 (monitor.collapse_share sets the threshold)")
        warnings.warn(message, SynthesisCollapseWarning, stacklevel=2)
        return message

    def state_dict(self) -> dict[str, Any]:
        # the counts too: a checkpoint can fall inside a log interval
        counts = None if self._counts is None else self._counts.detach().cpu()
        return {"warned": self.warned, "counts": counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warned = bool(state.get("warned", False))
        self._counts = state.get("counts")
