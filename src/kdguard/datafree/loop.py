"""The data-free distillation loop: alternate synthesis and student updates, monitor, checkpoint.

Schedule (documented in ``docs/datafree.md``)::

    for round r in 0 .. rounds-1:
        learning rates ← schedule(r / rounds)            (student: a LambdaLR stepped per round;
                                                          generator/inputs: the same factor)
        synthesizer.synthesize()                         (generator_steps inside)
        repeat student_steps times:
            x ← synthesizer.sample(batch_size)
            teacher outputs of x (inference mode; computed once when x is the round's batch)
            student_step(ctx)                            (default: KD loss, backward, clip, step)
        every monitor.every rounds: CA/ASR/RA on the test split, and the teacher's class shares
                                    on the synthetic images (collapse check) → metrics.jsonl
        every monitor.grid_every rounds: PNG grid of synthetic images
        every monitor.checkpoint_every rounds (and at every evaluation): datafree_state.pt

The checkpoint holds the round counter, student weights and optimiser, the synthesizer's state
(generator, its optimiser, pools, memory bank, its RNGs), the global torch RNG and the history,
written atomically; :meth:`DataFreeLoop.run` on the same directory continues from it and makes
exactly the steps the uninterrupted run would have made (bitwise on CPU with fixed threads), and
rewrites ``metrics.jsonl`` to the restored records.

A run resumed with more rounds than it was planned for (``--resume`` with a larger
``schedule.rounds``) stretches the rest of its schedules over the new budget: from the resumed
round ``s`` on, the progress the student's and the synthesizer's learning rates are evaluated at
is ``p_s + (1 − p_s)(round − s)/(rounds − s)``, ``p_s`` the progress reached at ``s`` (exact
fractions). A learning rate so continues from where it was and never rises again.

Performance: losses are accumulated on the device and only read at log points; the teacher runs
under ``torch.inference_mode`` for student steps; the student's weights are frozen (not just
ignored) while a generator step back-propagates through it.
"""

from __future__ import annotations

import logging
import math
import time
from fractions import Fraction
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OptimConfig
from ..distill.probe import GuardedTaps
from ..errors import KDGuardError
from ..log import bar_disabled
from ..optim import advance, build_optimizer, current_lr, lr_scheduler, schedule_factor
from ..train.engine import StepEngine, read_state_file
from .collapse import ClassShareMonitor
from .config import MonitorConfig
from .grid import save_image_grid
from .student import (DistillObjective, SampleWeighting, StudentStep, StudentStepContext, TeacherOutputs,
                      default_student_step, mean_weighting)
from .synthesizers.base import GeneratorRegularizer, Synthesizer

logger = logging.getLogger(__name__)

STATE_FILE = "datafree_state.pt"


def saved_round(run_dir: str | Path) -> int | None:
    """The round at which ``run_dir``'s checkpoint (``datafree_state.pt``) was written, or None
    without one; loaded as data (``weights_only=True``)."""
    path = Path(run_dir) / STATE_FILE
    return int(read_state_file(path)["round"]) if path.exists() else None


@dataclass
class DataFreeExtensions:
    """The hooks a defence (ABD) plugs into a run; see ``docs/datafree.md``.

    Attributes:
        generator_regularizers: extra generator/input losses, ``(x, teacher_logits) -> {name:
            scalar}`` (ABD's Shuffling Vaccine).
        student_step: replacement of :func:`~kdguard.datafree.student.default_student_step`,
            ``(ctx) -> {name: scalar}`` (ABD's Self-Retrospection).
        sample_weighting: replacement of :func:`~kdguard.datafree.student.mean_weighting`,
            ``(per_sample, x, teacher_logits) -> {name: scalar}`` (ABD's OOD vaccine).

    Any of them with ``state_dict``/``load_state_dict`` methods is saved in the checkpoint; any
    with an ``interval_log() -> {name: value}`` method adds its values to every log record
    (``RoundRecord.defence``), e.g. the share of samples the vaccine flagged in the interval.
    """

    generator_regularizers: list[GeneratorRegularizer] = field(default_factory=list)
    student_step: StudentStep | None = None
    sample_weighting: SampleWeighting | None = None


@dataclass
class RoundRecord:
    """One log line: losses averaged since the previous record, test metrics, timing,
    ``synthesis``: the teacher's class shares on the interval's synthetic images
    (:meth:`~kdguard.datafree.collapse.ClassShareMonitor.summary`), and ``defence``: what the
    extensions report for the interval (their ``interval_log``; empty without a defence)."""

    round: int
    seconds: float
    student_lr: float
    generator_losses: dict[str, float]
    student_losses: dict[str, float]
    eval: dict[str, Any] = field(default_factory=dict)
    synthesis: dict[str, Any] = field(default_factory=dict)
    defence: dict[str, Any] = field(default_factory=dict)


class DataFreeLoop(StepEngine):
    """Runs a data-free distillation (see the module docstring).

    The device, precision, optimiser step, state file and ``metrics.jsonl`` mechanics are the
    ones the epoch loops share (:class:`~kdguard.train.engine.StepEngine`); the schedule is
    per round.

    Args:
        synthesizer: the method's :class:`Synthesizer`.
        student, teacher: the models on ``device`` (teacher frozen and in eval mode).
        objective: the method's :class:`DistillObjective`.
        rounds: the budget (rounds = synthetic batches).
        student_steps: student updates per round.
        batch_size: images per student update.
        optim: student optimiser settings.
        device: where training runs.
        bf16: bf16 autocast for forward passes.
        run_dir: checkpoint/metrics/grid directory (``None``: nothing is written).
        evaluate: ``student -> {metric: value}`` on the real test split (``None``: no metrics).
        monitor: evaluation, grid and checkpoint intervals.
        extensions: defence hooks (:class:`DataFreeExtensions`).
        progress: show a progress bar.
        desc: progress-bar label.

    Raises:
        KDGuardError: bad sizes, or a teacher whose parameters require gradients.
    """

    own_history_file = True  # a data-free run directory logs its rounds only

    def __init__(self, synthesizer: Synthesizer, student: nn.Module, teacher: nn.Module,
                 objective: DistillObjective, *, rounds: int, student_steps: int, batch_size: int,
                 optim: OptimConfig, device: torch.device, bf16: bool = False,
                 run_dir: str | Path | None = None,
                 evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
                 monitor: MonitorConfig | None = None, extensions: DataFreeExtensions | None = None,
                 progress: bool = True, desc: str = "datafree") -> None:
        if rounds < 1 or student_steps < 0 or batch_size < 1:
            raise KDGuardError(f"rounds={rounds}, student_steps={student_steps}, batch_size={batch_size} "
                               "are invalid", "give rounds >= 1, student_steps >= 0, batch_size >= 1")
        if any(p.requires_grad for p in teacher.parameters()):
            raise KDGuardError("the teacher's parameters require gradients",
                               "freeze the teacher before building the loop")
        self.synth, self.student, self.teacher, self.objective = synthesizer, student, teacher, objective
        self.rounds, self.student_steps, self.batch_size = int(rounds), int(student_steps), int(batch_size)
        self.optim_settings = optim
        self._init_step_engine(build_optimizer([p for p in student.parameters() if p.requires_grad], optim),
                               optim.grad_clip)
        self.device, self.bf16 = torch.device(device), bool(bf16)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate = evaluate
        self.monitor = monitor or MonitorConfig()
        self.ext = extensions or DataFreeExtensions()
        self.synth.generator_regularizers.extend(self.ext.generator_regularizers)
        self.student_step: StudentStep = self.ext.student_step or default_student_step
        self.sample_weighting: SampleWeighting = self.ext.sample_weighting or mean_weighting
        self.show_progress, self.desc = progress, desc
        self.round = 0
        self.history: list[RoundRecord] = []
        # schedule extensions: {"round": s, "progress": [num, den]} (module docstring)
        self.segments: list[dict[str, Any]] = []
        # start of the current log interval (perf_counter); a checkpoint between two log records
        # carries the seconds since it, so a resumed run's train_seconds covers every round once
        self._interval_start = time.perf_counter()
        self._student_taps = GuardedTaps(student, objective.student_paths) if objective.uses_features else None
        self._teacher_taps = (GuardedTaps(teacher, objective.teacher_paths, detach=True)
                              if objective.uses_features else None)
        self._cache: tuple[torch.Tensor, TeacherOutputs] | None = None
        self.class_shares = ClassShareMonitor(self.monitor.collapse_share)

    # -- one round ------------------------------------------------------------------------------
    def teacher_outputs(self, x: torch.Tensor) -> TeacherOutputs:
        """The teacher's logits (and features) for ``x``, without gradient; reused when ``x`` is
        the very batch of the previous call (the synthesizer serves one batch per round). Each
        batch computed here is counted once by the collapse check (``class_shares``)."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        if self._teacher_taps is not None:  # guarded taps need version counters: no_grad
            with torch.no_grad(), self.autocast():
                logits, feats = self._teacher_taps(x)
            out = TeacherOutputs(logits, dict(feats))
        else:
            with torch.inference_mode(), self.autocast():
                logits = self.teacher(x)
            out = TeacherOutputs(logits.clone())  # a normal tensor, usable in autograd graphs
        self.class_shares.update(out.logits)
        self._cache = (x, out) if self.synth.reuses_batch else None
        return out

    def _student_round(self, sums: dict[str, torch.Tensor]) -> None:
        self.student.train()
        self.teacher.eval()
        for _ in range(self.student_steps):
            x = self.synth.sample(self.batch_size)
            ctx = StudentStepContext(
                student=self.student, teacher=self.teacher, optimizer=self.optimizer, x=x,
                teacher_outputs=self.teacher_outputs(x), objective=self.objective,
                sample_weighting=self.sample_weighting, student_taps=self._student_taps,
                grad_clip=self.grad_clip, autocast=self.autocast,
                round_index=self.round, total_rounds=self.rounds, params=self.params)
            losses = self.student_step(ctx)
            for k, v in losses.items():
                v = v.detach().float() / self.student_steps
                sums[k] = sums[k] + v if k in sums else v
        self._cache = None

    # -- monitoring -----------------------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return self.round == self.rounds or (every > 0 and self.round % every == 0)

    @staticmethod
    def _floats(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        return {k: float(v) / max(count, 1) for k, v in sums.items()}

    def _write_history(self) -> None:
        self.sync_history([asdict(r) for r in self.history])

    def _save_grid(self) -> None:
        if self.run_dir is None:
            return
        images = self.synth.preview(self.monitor.grid_size)
        if len(images):
            save_image_grid(self.run_dir / f"synthetic_r{self.round:06d}.png", images)

    def _interval_logs(self) -> dict[str, Any]:
        """The extensions' values for the interval that ends now (``interval_log``)."""
        out: dict[str, Any] = {}
        for fn in (*self.ext.generator_regularizers, self.ext.student_step, self.ext.sample_weighting):
            if fn is not None and hasattr(fn, "interval_log"):
                out.update(fn.interval_log())
        return out

    # -- checkpointing --------------------------------------------------------------------------
    def _extension_states(self) -> dict[str, Any]:
        out = {}
        for name in ("student_step", "sample_weighting"):
            fn = getattr(self.ext, name)
            if fn is not None and hasattr(fn, "state_dict"):
                out[name] = fn.state_dict()
        return out

    def state_dict(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"round": self.round, "rounds": self.rounds,
                "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "synthesizer": self.synth.state_dict(),
                "rng": rng, "history": [asdict(r) for r in self.history],
                "pending_seconds": time.perf_counter() - self._interval_start,
                "extensions": self._extension_states(), "class_shares": self.class_shares.state_dict(),
                "schedule": [dict(s) for s in self.segments]}

    def save_state(self) -> None:
        if self.run_dir is not None:
            self.write_state(STATE_FILE, self.state_dict())

    def try_resume(self) -> bool:
        """Load ``datafree_state.pt`` from ``run_dir`` if present; return whether it resumed.

        Raises:
            KDGuardError: the file is unreadable or belongs to a different model/method.
        """
        path = self.run_dir / STATE_FILE if self.run_dir else None
        try:
            state = self.read_state(STATE_FILE)
            if state is None:
                return False
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.synth.load_state_dict(state["synthesizer"])
        except Exception as e:
            raise KDGuardError(f"cannot resume from {str(path)!r} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]})",
                               "use a fresh output directory, or delete the file to restart") from None
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        for name, ext_state in state.get("extensions", {}).items():
            fn = getattr(self.ext, name, None)
            if fn is not None and hasattr(fn, "load_state_dict"):
                fn.load_state_dict(ext_state)
        self.class_shares.load_state_dict(state.get("class_shares", {}))
        self.round = int(state["round"])
        self.history = [RoundRecord(**r) for r in state["history"]]
        self.segments = [dict(s) for s in state.get("schedule", [])]
        planned = int(state.get("rounds", self.rounds))
        if planned < self.rounds and self.round < self.rounds:  # a longer budget: stretch the rest
            p = self.progress(self.round, planned)
            self.segments.append({"round": self.round, "progress": [p.numerator, p.denominator]})
        self._interval_start = time.perf_counter() - float(state.get("pending_seconds", 0.0))
        self._write_history()  # drop log lines written after the checkpoint
        return True

    def progress(self, round_index: int, rounds: int | None = None) -> Fraction:
        """The schedules' position at ``round_index`` of a budget of ``rounds`` (default: this
        run's), with the extensions (module docstring) applied."""
        rounds = self.rounds if rounds is None else rounds
        p = Fraction(round_index, max(rounds, 1))
        for seg in self.segments:
            start = int(seg["round"])
            if round_index >= start:
                p0 = Fraction(*seg["progress"])
                p = p0 + (1 - p0) * Fraction(round_index - start, max(rounds - start, 1))
        return p

    def lr_factor(self, round_index: int) -> float:
        """The student's learning-rate factor at ``round_index`` (:func:`kdguard.optim.schedule_factor`
        at :meth:`progress`)."""
        return schedule_factor(self.optim_settings, float(self.progress(round_index)))

    # -- driver ---------------------------------------------------------------------------------
    def run(self, *, resume: bool = True, stop_after: int | None = None) -> list[RoundRecord]:
        """Run (or continue) the rounds; return the history of records.

        Args:
            resume: continue from ``run_dir``'s checkpoint when there is one.
            stop_after: return (after checkpointing) once this many rounds are done, as if the
                process had been stopped there (used to test resumption).

        Raises:
            KDGuardError: a loss became non-finite.
        """
        self._interval_start = time.perf_counter()
        if resume:
            self.try_resume()
        stop = self.rounds if stop_after is None else min(stop_after, self.rounds)
        self.scheduler = lr_scheduler(self.optimizer, self.optim_settings.lr, lambda r: self.lr_factor(r),
                                      start=self.round)
        bar = tqdm(total=self.rounds, initial=self.round, desc=self.desc, unit="round",
                   disable=bar_disabled(self.show_progress), dynamic_ncols=True)
        g_sums: dict[str, torch.Tensor] = {}
        s_sums: dict[str, torch.Tensor] = {}
        count = 0
        try:
            while self.round < stop:
                lr = current_lr(self.scheduler)
                if self.segments:
                    at = self.progress(self.round)
                    self.synth.set_progress(at.numerator, at.denominator)  # the same position
                else:
                    self.synth.set_progress(self.round, self.rounds)
                for k, v in self.synth.synthesize().items():
                    v = v.detach().float()
                    g_sums[k] = g_sums[k] + v if k in g_sums else v
                self._student_round(s_sums)
                self.round += 1
                advance(self.scheduler)  # an extension (ABD SR) may have set its own rate this round
                count += 1
                bar.update(1)
                evaluate_now = self._due(self.monitor.every)
                if evaluate_now:
                    record = RoundRecord(self.round, time.perf_counter() - self._interval_start, lr,
                                         self._floats(g_sums, count), self._floats(s_sums, count),
                                         synthesis=self.class_shares.summary(), defence=self._interval_logs())
                    first = self.history[-1].round + 1 if self.history else 1
                    self.class_shares.warn_once(record.synthesis, first, self.round)
                    bad = {k: v for k, v in {**record.generator_losses, **record.student_losses}.items()
                           if not math.isfinite(v)}
                    if bad:
                        raise KDGuardError(f"loss became non-finite by round {self.round}: {bad}",
                                           "lower the learning rates or set a grad_clip")
                    if self.evaluate is not None:
                        record.eval = dict(self.evaluate(self.student))
                    self.history.append(record)
                    self._write_history()
                    g_sums, s_sums, count = {}, {}, 0
                    self._interval_start = time.perf_counter()
                    shown = {k: f"{100 * v:.1f}" for k, v in record.eval.items()
                             if k in ("ca", "asr") and v is not None}
                    bar.set_postfix(shown or {k: f"{v:.3g}" for k, v in record.student_losses.items()})
                    if record.eval:
                        logger.info(f"[{self.desc}] round {self.round}/{self.rounds} "
                                    + " ".join(f"{k}={v:.4f}" for k, v in record.eval.items()
                                               if isinstance(v, float)))
                    logger.debug(f"[{self.desc}] round {self.round}: lr={lr:.6g} " + " ".join(
                        f"{k}={v:.4g}" for k, v in {**record.generator_losses, **record.student_losses}.items()))
                if self._due(self.monitor.grid_every):
                    self._save_grid()
                if evaluate_now or self._due(self.monitor.checkpoint_every) or self.round == stop:
                    self.save_state()
        finally:
            bar.close()
        return self.history

    def close(self) -> None:
        """Remove the feature hooks this loop and its synthesizer installed."""
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self.synth.close()
