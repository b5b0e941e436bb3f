"""Unlearning a reconstructed trigger (Neural Cleanse's mitigation, Wang et al., S&P 2019, §VI-C).

The model is fine-tuned on the defender's clean labelled subset in which a share of the images
(the paper: 20 %) carry the *reconstructed* trigger while keeping their true labels, so the
trigger → target shortcut is trained away. The trigger comes from an audit
(``kdguard defend --model RUN method=unlearn --from-audit AUDIT_DIR``, which sets
``unlearn.trigger`` to the audit's suspected target and its ``patch`` trigger files) or from any
attack configuration given as ``unlearn.trigger.*``.

The images are stamped once, before training (seeded choice of images; the stamped pixels are
rounded to uint8 like every stored image), and then augmented like the rest. The defended model
is evaluated against the model's *recorded* attack (the real trigger, when known), not against
the reconstructed one; ``kdguard evaluate --from-audit`` measures the latter.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..attacks import make_attack
from ..errors import KDGuardError, check_range
from ..runs import RunResult
from .base import register_defense
from .config import DefenseJob
from .runner import finish_defense, prepare_defense


@register_defense("unlearn", title="Unlearning a reconstructed trigger", stage="before", clean_fraction=0.05,
                  labels=True, teacher_access=True,
                  source="Neural Cleanse mitigation by unlearning (Wang et al., S&P 2019, §VI-C)")
def run_unlearn(job: DefenseJob, *, threads: int | None = None) -> RunResult:
    """Fine-tune ``job.model`` on its clean subset with ``job.unlearn.share`` of the images stamped
    with ``job.unlearn.trigger`` and their labels kept (schedule ``job.train``, as ``ft``).

    Raises:
        KDGuardError: no ``unlearn.trigger`` (pass ``--from-audit DIR``), a share outside (0, 1],
            a trigger :func:`kdguard.attacks.make_attack` refuses, or see
            :func:`kdguard.defenses.runner.prepare_defense`.
    """
    cfg = job.unlearn
    if cfg.trigger is None or not cfg.trigger.name:
        raise KDGuardError("method=unlearn needs the trigger to unlearn",
                           "pass --from-audit AUDIT_DIR (a `kdguard audit` run) or unlearn.trigger.name=...")
    check_range("unlearn share", cfg.share, 0.0, 1.0, low_open=True)
    ctx = prepare_defense(job, threads=threads)
    spec = make_attack(cfg.trigger, ctx.data.train.shape, ctx.data.train.num_classes)
    images = ctx.clean.images.clone()
    gen = torch.Generator().manual_seed(job.seed + 2)
    picked = torch.randperm(len(images), generator=gen)[:max(1, round(cfg.share * len(images)))]
    images[picked] = spec.trigger(images[picked])
    ctx.clean = replace(ctx.clean, images=images)
    history = ctx.fit(ctx.model, run_dir=ctx.out, desc="unlearn")
    note = (f"{len(picked)} of {len(images)} clean images carried the trigger to unlearn "
            f"({spec.name}, suspected target {spec.target}) with their true labels.")
    return finish_defense(ctx, ctx.model, histories={"unlearning": history},
                          extra_manifest={"unlearned_trigger": {"name": spec.name, "target": spec.target,
                                                                "stamped": len(picked)}}, notes=note)
