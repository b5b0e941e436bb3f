"""What a data-free round costs: wall seconds, images through teacher and student, FLOPs.

The measuring parts of the speed benchmarks ``benchmarks/datafree_cost.py`` (fresh models, one
round of a method with or without the ABD plug-in) and ``benchmarks/abd_sv_resume_cost.py`` (a
real run continued with and without the Shuffling Vaccine); the scripts only choose variants and
print tables (``docs/abd-cost.md``, ``docs/datafree-cost.md``).

Times are wall seconds from ``time.perf_counter``, synchronised on CUDA before reading; images
are counted on the host by forward pre-hooks (no device sync); FLOPs are
``torch.utils.flop_counter`` counts (convolutions and matmuls, forward and backward) of one round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..abd import ShufflingVaccine, build_abd
from ..datafree import DataFreeLoop, MethodContext, build_method
from ..runtime import autocast
from .datafree import DataFreeABDJob, abd_extensions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an ``n×n`` by ``n×n`` ``torch.mm`` in ``dtype`` (the best of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class ImageCounter:
    """Counts the images through a model's forwards (a host-side integer), whatever they are for."""

    def __init__(self, model: nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.images += int(args[0].shape[0])


@dataclass(frozen=True)
class RoundVariant:
    """How a round is computed: precision, memory format, teacher-output reuse, whole-batch SV."""

    bf16: bool = False
    channels_last: bool = False
    reuse_batch: bool = True          # False: the teacher re-runs per student step (reference codes)
    sv_whole_batch: bool = False      # SV's shuffled teacher with gradient on the whole batch


def round_cost(job: DataFreeABDJob, teacher: nn.Module, student: nn.Module, image_shape: tuple[int, int, int],
               device: torch.device, variant: RoundVariant = RoundVariant(), *, rounds: int = 2,
               warmup: int = 1, num_classes: int = 10) -> dict[str, Any]:
    """Time ``rounds`` rounds of ``job``'s method (and ABD plug-in, ``job.abd``) after ``warmup``.

    ``teacher`` and ``student`` are used as given (moved to ``device``; the cost does not depend
    on their weights, except SV's flagged share on a trained teacher). Returns seconds per round
    (whole, synthesis, student), images per second through teacher and student, GFLOP of one more
    round and GFLOP/s, and SV's flagged share (warm-up included; None without SV).
    """
    teacher, student = teacher.to(device).eval(), student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if variant.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    c = image_shape[0]
    ctx = MethodContext(teacher=teacher, student=student, image_shape=image_shape, num_classes=num_classes,
                        mean=(0.5,) * c, std=(0.25,) * c, hflip=True, device=device, bf16=variant.bf16, seed=0)
    parts = build_method(job, ctx)
    abd = build_abd(job.abd, teacher=teacher, image_shape=image_shape, device=device, method=job.method,
                    autocast=lambda: autocast(device, variant.bf16))
    vaccine = getattr(abd, "vaccine", None) if abd is not None else None
    if vaccine is not None and variant.sv_whole_batch:
        vaccine.SUBSET_MAX_SHARE = -1.0
    synth = parts.synthesizer
    if not variant.reuse_batch:
        synth.reuses_batch = False
    spent = [0.0]
    synthesize = synth.synthesize

    def timed() -> Any:
        t0 = time.perf_counter()
        out = synthesize()
        _sync(device)
        spent[0] += time.perf_counter() - t0
        return out

    synth.synthesize = timed
    loop = DataFreeLoop(synth, student, teacher, parts.objective, rounds=warmup + rounds + 1,
                        student_steps=parts.student_steps, batch_size=job.schedule.batch_size,
                        optim=job.student_optim, device=device, bf16=variant.bf16, progress=False,
                        extensions=abd.extensions if abd is not None else None)
    loop.monitor.every = loop.monitor.grid_every = loop.monitor.checkpoint_every = 0
    try:
        loop.run(resume=False, stop_after=warmup)
        t_count, s_count = ImageCounter(teacher), ImageCounter(student)
        spent[0] = 0.0
        _sync(device)
        t0 = time.perf_counter()
        loop.run(resume=False, stop_after=warmup + rounds)
        _sync(device)
        seconds = (time.perf_counter() - t0) / rounds
        synthesis = spent[0] / rounds  # before the counted round below adds to it
        with FlopCounterMode(display=False) as flops:
            loop.run(resume=False, stop_after=warmup + rounds + 1)
    finally:
        loop.close()
    t_count.handle.remove()
    s_count.handle.remove()
    gflop = flops.get_total_flops() / 1e9
    return {"seconds_per_round": seconds, "synthesis_seconds": synthesis, "student_seconds": seconds - synthesis,
            "teacher_images_per_s": t_count.images / rounds / seconds,
            "student_images_per_s": s_count.images / rounds / seconds,
            "gflop_per_round": gflop, "gflops": gflop / seconds,
            "batch": job.schedule.batch_size, "synthesis_batch": job.schedule.synthesis_batch_size or job.schedule.batch_size,
            "generator_steps": job.schedule.generator_steps, "student_steps": parts.student_steps,
            "sv_flagged_share": None if vaccine is None else vaccine.flagged_share}


class ShuffledPassTimer:
    """Times the Shuffling Vaccine's shuffled-teacher passes of one data-free run (seconds and
    calls, with and without gradient): pass it as ``run_datafree(job, extensions=timer)``. It builds
    the job's ABD as the job does (:func:`kdguard.jobs.abd_extensions`) and wraps that vaccine's
    ``shuffled_logits`` (this run's object only)."""

    def __init__(self) -> None:
        self.seconds = {"no_grad": 0.0, "grad": 0.0}
        self.calls = {"no_grad": 0, "grad": 0}

    def __call__(self, job: Any, setup: Any) -> Any:
        plugin = abd_extensions(job, setup)
        vaccine: ShufflingVaccine | None = plugin.vaccine if plugin is not None else None
        if vaccine is not None:
            original = vaccine.shuffled_logits

            def timed(x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
                t0 = time.perf_counter()
                out = original(x, grad=grad)
                key = "grad" if grad else "no_grad"
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1
                return out

            vaccine.shuffled_logits = timed  # type: ignore[method-assign]
        return plugin


def median_run(runs: list[dict[str, Any]], key: str = "seconds_per_round") -> dict[str, Any]:
    """The run with the median ``key`` (the lower one of an even count), plus every repeat's
    value (``samples``) and the count (``repeats``)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": len(runs), "samples": [r[key] for r in runs]}


def cost_table(rows: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    """Markdown table of :func:`round_cost` rows (with ``method``, ``variant``, ``abd`` and, from
    :func:`median_run`, ``repeats``/``samples``); % of peak against ``peaks["bf16"]`` for bf16
    variants, else ``peaks["fp32"]`` (GFLOP/s of :func:`matmul_peak`)."""
    lines = ["| method | variant | ABD | batch | g-steps | s-steps | s/round (median, range) | synthesis s | "
             "student s | teacher img/s | student img/s | GFLOP/round | GFLOP/s | % of peak | SV flagged |",
             "|---" * 15 + "|"]
    for x in rows:
        flagged = "" if x["sv_flagged_share"] is None else f"{100 * x['sv_flagged_share']:.0f} %"
        spread = f" ({min(x['samples']):.3f}–{max(x['samples']):.3f})" if x.get("repeats", 1) > 1 else ""
        peak = peaks["bf16" if x["variant"].startswith("bf16") else "fp32"]
        lines.append(f"| {x['method']} | {x['variant']} | {x['abd']} | {x['batch']} | {x['generator_steps']} | "
                     f"{x['student_steps']} | {x['seconds_per_round']:.3f}{spread} | {x['synthesis_seconds']:.3f} | "
                     f"{x['student_seconds']:.3f} | {x['teacher_images_per_s']:.0f} | {x['student_images_per_s']:.0f} | "
                     f"{x['gflop_per_round']:.2f} | {x['gflops']:.1f} | {100 * x['gflops'] / peak:.0f} | {flagged} |")
    return "\n".join(lines)
