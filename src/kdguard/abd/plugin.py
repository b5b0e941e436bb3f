"""Assemble ABD (SV and/or SR) as :class:`~kdguard.datafree.loop.DataFreeExtensions` for any
data-free method: ``abd.mode = off | sv | sr | full``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..datafree.loop import DataFreeExtensions
from .config import ABDConfig
from .retrospection import SelfRetrospection
from .shuffle import ShuffledTeacher
from .vaccine import ShufflingVaccine, VaccineWeighting


#: the shuffles of a run with seed ``s`` come from ``torch.Generator().manual_seed(s + SHUFFLE_SEED_OFFSET)``
#: (an offset, so they differ from the student and generator initialisation of the same seed)
SHUFFLE_SEED_OFFSET = 7919


@dataclass
class ABDPlugin:
    """The built defence: its extensions plus the parts, for summaries and tests."""

    extensions: DataFreeExtensions
    vaccine: ShufflingVaccine | None = None
    retrospection: SelfRetrospection | None = None

    def summary(self) -> dict[str, Any]:
        """What ran, for ``metrics.json`` (``abd`` key)."""
        out: dict[str, Any] = {}
        if self.vaccine is not None:
            out["sv"] = self.vaccine.summary()
        if self.retrospection is not None:
            out["sr"] = self.retrospection.summary()
        return out


def build_abd(cfg: ABDConfig, *, teacher: nn.Module, image_shape: tuple[int, int, int],
              device: torch.device, method: str, seed: int = 0,
              input_std: tuple[float, ...] | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              sr_trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
              student: nn.Module | None = None) -> ABDPlugin | None:
    """ABD for one run, or ``None`` when ``cfg.mode == "off"``.

    Args:
        cfg: the job's ``abd`` section.
        teacher: the frozen teacher on ``device``.
        image_shape: ``(C, H, W)`` of the teacher's input.
        method: the data-free method; the vaccine's ``auto`` form is the student form for
            ``ood`` (no generator) and the generator form otherwise.
        seed: seeds the shuffles and the SR sample choice.
        input_std: the teacher's per-channel input std (SR's perturbation lives in normalised
            units, as in the reference); ``None`` = 1.
        autocast: forward-pass context (bf16 or no-op).
        sr_trigger: a trigger SR unlearns instead of searching δ (``abd.sr.from_audit``, built by
            the job layer from the audit's files).
        student: given, SR's ``modules`` are checked against it here rather than at the first
            SR round.

    Raises:
        KDGuardError: the teacher has no layer to shuffle, ``abd.sr.modules`` names no module of
            ``student``, or bad settings.
    """
    if cfg.mode == "off":
        return None
    ext = DataFreeExtensions()
    vaccine = retro = None
    if cfg.uses_sv:
        sv = cfg.sv
        rng = torch.Generator().manual_seed(seed + SHUFFLE_SEED_OFFSET)
        example = torch.zeros((2, *image_shape), device=device)
        shuffled = ShuffledTeacher(teacher, example, layers=sv.layers, ensemble=sv.ensemble, generator=rng)
        vaccine = ShufflingVaccine(teacher, shuffled, coef=sv.coef, shuffle_grad=sv.shuffle_grad,
                                   verify_batches=sv.verify_batches, verify_skip=sv.verify_skip,
                                   tail_threshold=sv.tail_threshold, max_trials=sv.max_trials,
                                   generator=rng, autocast=autocast)
        form = sv.form if sv.form != "auto" else ("student" if method == "ood" else "generator")
        if form == "student":
            ext.sample_weighting = VaccineWeighting(vaccine)
        else:
            ext.generator_regularizers.append(vaccine)
    if cfg.uses_sr:
        retro = SelfRetrospection(cfg.sr, seed=seed, input_std=input_std, trigger=sr_trigger)
        if student is not None:
            retro.unlearn_parameters(student)
        ext.student_step = retro
    return ABDPlugin(ext, vaccine, retro)
