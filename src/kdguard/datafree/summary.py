"""What a data-free run's history says: the synthesis summary and the CA/ASR curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import save_figure
from .loop import RoundRecord


def synthesis_summary(history: list[RoundRecord]) -> dict[str, Any]:
    """The last log interval's class-share statistics (:class:`RoundRecord` ``synthesis``) plus
    ``intervals`` (log intervals with statistics), ``collapsed_intervals`` and
    ``first_collapse_round`` (the round closing the first collapsed interval, or None)."""
    logged = [r for r in history if r.synthesis]
    if not logged:
        return {}
    collapsed = [r.round for r in logged if r.synthesis.get("collapsed")]
    return {**logged[-1].synthesis, "intervals": len(logged), "collapsed_intervals": len(collapsed),
            "first_collapse_round": collapsed[0] if collapsed else None}


def plot_datafree_curves(path: Path, history: list[RoundRecord]) -> Path | None:
    """CA/ASR (%) on the test split and the student loss over rounds, as one PNG."""
    from ..report import plt  # headless matplotlib, configured by kdguard.report

    points = [r for r in history if r.eval]
    if not points:
        return None
    rounds = [r.round for r in points]
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("ca", "-o"), ("asr", "--s")):
        vals = [r.eval.get(key) for r in points]
        if any(v is not None for v in vals):
            ax_m.plot(rounds, [100 * v if v is not None else float("nan") for v in vals], style,
                      ms=3, label=key.upper())
    for term in sorted({k for r in points for k in r.student_losses}):
        ax_l.plot(rounds, [r.student_losses.get(term, float("nan")) for r in points], label=term)
    ax_m.set(xlabel="round", ylabel="% (test split)", ylim=(-2, 102))
    ax_l.set(xlabel="round", ylabel="student loss")
    for ax in (ax_m, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
