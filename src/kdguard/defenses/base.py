"""What a defence is: a description (stage, what it needs) plus the function that runs it.

Every defence declares

* ``stage``: when it acts relative to distillation: ``"before"`` (repair the teacher, e.g.
  fine-tuning, fine-pruning, NAD applied to the poisoned model), ``"during"`` (a loss term or
  step of the distillation, e.g. ABD) or ``"after"`` (repair the student);
* what it needs: the default share of clean training data (``clean_fraction``, of the whole
  training set), whether that data must be labelled (``labels``), and whether it needs white-box
  access to the teacher's weights (``teacher_access``).

Defences are registered in :data:`DEFENSES` by name; the job that runs one is
:func:`kdguard.jobs.defend.run_defense`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import KDGuardError
from ..registry import Registry

if TYPE_CHECKING:  # the runner imports the run engine; keep this module import-light
    from ..runs import RunResult

STAGES = ("before", "during", "after")


@dataclass(frozen=True)
class Defense:
    """Description of one defence and its entry point.

    Attributes:
        name: registry name (``"ft"``, ``"fp"``, ``"nad"``).
        title: human-readable name for reports.
        stage: ``"before"`` | ``"during"`` | ``"after"`` distillation (see module docstring).
        clean_fraction: default share of the whole training set the defender holds, in (0, 1].
        labels: whether the clean data must be labelled.
        teacher_access: whether the defence needs the poisoned model's weights (white box).
        source: the paper (and reference code) the implementation follows.
        run: ``run(job: DefenseJob, *, threads=None) -> RunResult``; writes one run directory
            (``threads``: torch's intra-op threads, None for the default).

    Raises:
        KDGuardError: an unknown stage or a default clean fraction outside (0, 1].
    """

    name: str
    title: str
    stage: str
    clean_fraction: float
    labels: bool
    teacher_access: bool
    source: str
    run: Callable[..., "RunResult"]

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise KDGuardError(f"defense stage {self.stage!r} is not valid", f"use one of {', '.join(STAGES)}")
        if not 0.0 < self.clean_fraction <= 1.0:
            raise KDGuardError(f"default clean fraction {self.clean_fraction!r} is outside (0, 1]",
                               "give a fraction such as 0.05")

    def needs(self) -> dict[str, Any]:
        """The requirements as a plain dict (recorded in every defence manifest)."""
        d = asdict(self)
        return {k: d[k] for k in ("name", "title", "stage", "clean_fraction", "labels", "teacher_access",
                                  "source")}


DEFENSES: Registry[Defense] = Registry("defense")


def register_defense(name: str, *, title: str, stage: str, clean_fraction: float, labels: bool,
                     teacher_access: bool, source: str) -> Callable:
    """Decorator registering ``run(job, *, threads=None) -> RunResult`` as defence ``name`` in
    :data:`DEFENSES`."""

    def deco(run: Callable[..., "RunResult"]) -> Callable:
        DEFENSES.add(name, Defense(name=name, title=title, stage=stage, clean_fraction=clean_fraction,
                                   labels=labels, teacher_access=teacher_access, source=source, run=run))
        return run

    return deco
