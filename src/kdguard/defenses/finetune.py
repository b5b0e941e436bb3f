"""Fine-tuning (FT): train the poisoned model further on the defender's clean, labelled subset.

The standard baseline of the backdoor-defence literature (e.g. Liu et al., RAID 2018, §3; the
"fine-tuning" rows of NAD, Li et al. ICLR 2021, Table 1; BackdoorBench ``defense/ft.py``):
cross-entropy on the clean subset, nothing else. With kdguard's defaults it uses exactly the
schedule of NAD's student phase, so ``ft`` is NAD with β = 0 (the ablation NAD issues #4/#17
ask for).
"""

from __future__ import annotations

from ..runs import RunResult
from .base import register_defense
from .config import DefenseJob
from .runner import prepare_defense, finish_defense


@register_defense("ft", title="Fine-tuning", stage="before", clean_fraction=0.05, labels=True,
                  teacher_access=True, source="fine-tuning baseline (Liu et al. 2018; NAD Table 1; "
                  "BackdoorBench ft)")
def run_finetune(job: DefenseJob, *, threads: int | None = None) -> RunResult:
    """Fine-tune the poisoned model ``job.model`` on ``job.clean_fraction`` clean labelled data.

    The model is trained in place with :class:`kdguard.train.Trainer` (resumable from
    ``job.out/train_state.pt``, bf16 where it pays off) under ``job.train``; the poisoned run
    directory is only read. Returns the defended model's :class:`RunResult`.

    Raises:
        KDGuardError: see :func:`kdguard.defenses.runner.prepare_defense`.
    """
    ctx = prepare_defense(job, threads=threads)
    history = ctx.fit(ctx.model, run_dir=ctx.out, desc="ft")
    return finish_defense(ctx, ctx.model, histories={"fine-tuning": history})
