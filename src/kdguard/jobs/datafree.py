"""The data-free job: teacher checkpoint → data-free student (optionally with ABD), CA/ASR/RA at intervals.

The run directory holds, besides what every kdguard run writes (``config.yaml``,
``manifest.json``, ``model.safetensors``, ``metrics.json``, ``report.md``)::

    datafree_state.pt       resumable state (round, student, optimisers, generator, pools, RNGs)
    metrics.jsonl           one line per evaluation: losses, CA/ASR/RA on the test split
    synthetic_rNNNNNN.png   grids of synthetic images
    datafree_curves.png     CA/ASR over the rounds

Only the *test* split of the teacher's data set is loaded, and only to measure CA/ASR/RA; the
reported metrics are those of the last round (never the best over the test curve).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..abd import ABDConfig, ABDPlugin, build_abd, validate_abd
from ..attacks import AttackSpec
from ..config import AttackConfig, TrainConfig
from ..data import ImageDataset, load_dataset
from ..datafree.config import DataFreeJob, validate_job
from ..datafree.config import build_datafree_job as build_datafree_base
from ..datafree.loop import STATE_FILE, DataFreeExtensions, DataFreeLoop, RoundRecord, saved_round
from ..datafree.methods import MethodContext, build_method, input_statistics
from ..datafree.summary import plot_datafree_curves, synthesis_summary
from ..errors import KDGuardError
from ..models import build_model
from ..rundir import adopt_copy
from ..runs import RunContext, RunResult, evaluate_model
from ..runtime import autocast, resolve_device
from ..train.engine import place_modules

log = logging.getLogger(__name__)


@dataclass
class DataFreeABDJob(DataFreeJob):
    """The ``kdguard distill-datafree`` job: a data-free run plus ABD's ``abd`` section.

    :class:`~kdguard.datafree.config.DataFreeJob` knows nothing of ABD; this schema composes
    :class:`~kdguard.abd.config.ABDConfig` into it, so ``abd.mode=full`` and every ``abd.*`` key
    keep working. Its run identity (:func:`kdguard.rundir.job_record`) is the kind ``DataFreeJob``.
    """

    RUN_KIND: ClassVar[str] = "DataFreeJob"
    abd: ABDConfig = field(default_factory=ABDConfig)


def validate_datafree_job(job: DataFreeJob) -> None:
    """Check a data-free job (:func:`kdguard.datafree.config.validate_job`) and its ``abd`` section.

    Raises:
        KDGuardError: naming the first bad setting and the fix.
    """
    validate_job(job)
    abd = getattr(job, "abd", None)
    if abd is None:
        return
    validate_abd(abd)
    if abd.uses_sv and job.method == "ood" and abd.sv.form == "generator":
        raise KDGuardError("abd.sv.form=generator does nothing with method=ood (proxy images have no "
                           "generator to regularise)", "use abd.sv.form=auto or student for ood")


def build_datafree_job(yaml_path: str | Path | None = None,
                       overrides: list[str] | None = None) -> DataFreeABDJob:
    """Defaults ← preset ← YAML ← ``key=value`` overrides as a :class:`DataFreeABDJob`, checked.

    See :func:`kdguard.datafree.config.build_datafree_job` (this adds the ``abd`` section).

    Raises:
        KDGuardError: missing YAML file, malformed override, unknown key, wrong type, unknown
            method or preset, a missing ``teacher``, or a bad ``abd`` setting.
    """
    job = build_datafree_base(yaml_path, overrides, schema=DataFreeABDJob)
    validate_datafree_job(job)
    return job  # type: ignore[return-value]


def stopped_run_config(run_dir: str | Path) -> Path:
    """The ``config.yaml`` of a checkpointed data-free run (one stopped by ``schedule.stop_after``
    or interrupted), checked to have its ``datafree_state.pt`` beside it.

    Raises:
        KDGuardError: ``run_dir`` lacks the checkpoint or the config.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not (run_dir / STATE_FILE).exists() or not config.exists():
        raise KDGuardError(f"{run_dir}: no {STATE_FILE} and config.yaml there",
                           "give a data-free run directory with a checkpoint, e.g. one stopped at its "
                           "SR phase start (prefix_zskt_r1470_s0)")
    return config


def fork_datafree_run(run_dir: str | Path, out: str | Path, overrides: list[str]) -> DataFreeABDJob:
    """Copy a checkpointed run to ``out`` (replacing what is there) and return the job that
    continues the copy: the run's own ``config.yaml`` with ``out`` and ``overrides`` on top.

    Variants that must share a run's first rounds exactly (an SR phase, SV on or off) each
    continue their own fork; ``run_dir`` itself is left as it was. Run the job with
    :func:`run_datafree`, which resumes from the copied checkpoint. ``overrides`` that change
    what the checkpoint holds (models, method) make that resume fail with its own error.

    Raises:
        KDGuardError: ``run_dir`` has no checkpoint (:func:`stopped_run_config`), or an override
            is malformed or unknown (:func:`build_datafree_job`).
    """
    # the job is built and checked before anything is copied (the copy's config.yaml is the same
    # file): a fork of a finished run would run no round of its own
    job = build_datafree_job(stopped_run_config(run_dir), [f"out={out}", *overrides])
    done = saved_round(run_dir)
    if done is not None and done >= job.schedule.rounds:
        raise KDGuardError(f"{run_dir} has finished all {done} of its rounds: a fork would run none "
                           "of its own", "fork a run stopped early (schedule.stop_after=K), or raise "
                           "schedule.rounds in the fork's settings")
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run_dir, out)
    # the copy is the new job's run now (its run.json says so, and where it was forked from)
    adopt_copy(out, job, source=run_dir, parents=("teacher",))
    return job


@dataclass
class DataFreeForkJob:
    """Continue a stopped data-free run under other settings (a suite's ``datafree-fork`` stage).

    ``run`` is a data-free run stopped by ``schedule.stop_after`` (its checkpoint and
    ``config.yaml``); the fork copies it to ``out`` and continues the copy with the run's own
    settings and ``overrides`` on top (:func:`fork_datafree_run`), so forks of one run share its
    first rounds exactly: undefended ZSKT and ZSKT with SR over its last rounds, say.
    """

    run: str = "-"                          # the stopped run directory (the parent stage's)
    overrides: list[str] = field(default_factory=list)  # key=value settings that differ
    out: str = "runs/datafree_fork"


def build_fork_job(overrides: list[str]) -> DataFreeForkJob:
    """A :class:`DataFreeForkJob` from ``key=value`` settings (``run=`` and ``out=`` are its own;
    the rest are checked as data-free job settings now, against the defaults).

    Raises:
        KDGuardError: a malformed or unknown setting (:func:`build_datafree_job`).
    """
    import json

    own: dict[str, str] = {}
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("run", "out"):
            try:
                own[key] = str(json.loads(value))
            except ValueError:
                own[key] = value
        else:
            rest.append(item)
    build_datafree_job(None, ["teacher=unused", *rest])  # the parent run is not there yet: checks keys and values
    return DataFreeForkJob(run=own.get("run", "-"), overrides=rest, out=own.get("out", DataFreeForkJob.out))


def run_datafree_fork(job: DataFreeForkJob, *, threads: int | None = None) -> RunResult:
    """Fork ``job.run`` into ``job.out`` (replacing what is there) and run the continuation.

    Raises:
        KDGuardError: ``job.run`` holds no checkpoint, or as :func:`run_datafree` raises.
    """
    return continue_fork(fork_datafree_run(job.run, job.out, job.overrides), job.run, threads=threads)


def continue_fork(job: DataFreeABDJob, source: str | Path, *, threads: int | None = None) -> RunResult:
    """Run a fork made by :func:`fork_datafree_run` from ``source``. A failure before the fork ran
    a round of its own (no data root, a teacher that moved) removes the copy, so the same command
    can be given again once mended; a later failure leaves a resumable run.

    Raises:
        KDGuardError: as :func:`run_datafree` raises.
    """
    try:
        return run_datafree(job, threads=threads)
    except KDGuardError:
        if saved_round(job.out) == saved_round(source):
            shutil.rmtree(job.out, ignore_errors=True)
        raise


@dataclass
class DataFreeSetup:
    """What a data-free run is built from (:func:`prepare_datafree`).

    Attributes:
        teacher: the frozen teacher (eval mode, no parameter gradients) on ``device``.
        teacher_manifest: its manifest; ``test``: the test split of the dataset.
        attack_cfg, attack: the attack to evaluate (the job's, else the teacher's manifest's).
        student: the fresh student on ``device``; ``device``, ``bf16``: where and how it runs.
        ctx: the :class:`~.methods.MethodContext` the method's parts are built from.
    """

    teacher: nn.Module
    teacher_manifest: dict[str, Any]
    test: ImageDataset
    attack_cfg: AttackConfig | None
    attack: AttackSpec | None
    student: nn.Module
    device: torch.device
    bf16: bool
    ctx: MethodContext


def prepare_datafree(job: DataFreeJob, *, device: torch.device | None = None) -> DataFreeSetup:
    """Load the teacher and the test split, build the student and the method context of ``job``.

    Used by :func:`run_datafree` and by tools that restore a run (:func:`kdguard.diagnostics.rebuild_datafree_run`).
    ``device`` is where the models run (default: ``job.device`` resolved).

    Raises:
        KDGuardError: unreadable teacher, no dataset named, or a teacher that does not match
            the dataset's classes or channels.
    """
    teacher, t_manifest = RunContext.load_teacher(job.teacher, job.teacher_spec)
    dataset = job.data.name or t_manifest.get("dataset", {}).get("name")
    if not dataset:
        raise KDGuardError("the teacher's manifest names no dataset", "set data.name=NAME")
    test = load_dataset(dataset, "test", root=job.data.root)
    t_spec = t_manifest.get("model", {})
    if t_spec.get("num_classes") not in (None, test.num_classes) or \
            t_spec.get("in_channels") not in (None, test.channels):
        raise KDGuardError(f"teacher ({t_spec.get('num_classes')} classes, {t_spec.get('in_channels')} "
                           f"channels) does not match dataset {test.name!r} ({test.num_classes} classes, "
                           f"{test.channels} channels)", "set data.name to the teacher's dataset")
    attack_cfg, attack = RunContext.attack(job.attack, t_manifest, test.shape, test.num_classes)

    if device is None:
        device = resolve_device(job.device, setting="device")
    student = build_model(job.student, num_classes=test.num_classes, in_channels=test.channels,
                          mean=test.mean, std=test.std)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bf16, _ = place_modules([teacher, student], device, amp=job.amp, channels_last=job.channels_last,
                            net=student)
    mean, std = input_statistics(teacher, test.mean, test.std)
    ctx = MethodContext(teacher=teacher, student=student, image_shape=test.shape,
                        num_classes=test.num_classes, mean=mean, std=std, hflip=test.hflip,
                        device=device, bf16=bf16, seed=job.seed, data_root=job.data.root)
    return DataFreeSetup(teacher, t_manifest, test, attack_cfg, attack, student, device, bf16, ctx)


def abd_extensions(job: DataFreeJob, setup: DataFreeSetup) -> ABDPlugin | None:
    """ABD built from ``job.abd`` for the run ``setup`` describes (the default of
    :func:`run_datafree`); None when the job has no ``abd`` section or ``abd.mode=off``.

    Raises:
        KDGuardError: as :func:`kdguard.abd.build_abd` (no layer to shuffle, bad settings).
    """
    cfg: ABDConfig | None = getattr(job, "abd", None)
    if cfg is None or cfg.mode == "off":
        return None
    device, bf16 = setup.device, setup.bf16
    return build_abd(cfg, teacher=setup.teacher, image_shape=setup.test.shape, device=device,
                     method=job.method, seed=job.seed, input_std=setup.ctx.std,
                     autocast=lambda: autocast(device, bf16), sr_trigger=audit_sr_trigger(cfg, setup),
                     student=setup.student)


def audit_sr_trigger(cfg: ABDConfig, setup: DataFreeSetup) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reconstructed trigger of ``abd.sr.from_audit`` (class ``abd.sr.audit_class``, else the
    audit's first suspect), or with ``abd.sr.oracle_trigger`` the teacher's own recorded trigger,
    as a batched function on [0, 1] images, on the run's device; None without either. The audit
    directory is read as data (its ``.npy`` trigger files).

    Raises:
        KDGuardError: as :func:`kdguard.jobs.audit.audit_trigger` (no audit there, no suspect and
            no class given, a class outside the audit's), a trigger that does not fit the images,
            or ``oracle_trigger`` on a teacher whose manifest records no attack.
    """
    if not cfg.uses_sr:
        return None
    if cfg.sr.oracle_trigger:
        if setup.attack is None:
            raise KDGuardError("abd.sr.oracle_trigger needs the teacher's recorded attack, and its manifest "
                               "records none", "give the attack (attack.name=...) or drop abd.sr.oracle_trigger")
        trigger = setup.attack.trigger
    elif cfg.sr.from_audit is not None:
        from ..attacks import make_attack
        from .audit import audit_trigger

        attack_cfg = audit_trigger(cfg.sr.from_audit, cfg.sr.audit_class)
        trigger = make_attack(attack_cfg, setup.test.shape, setup.test.num_classes).trigger
        if setup.attack is not None and int(setup.attack.target) != int(attack_cfg.target):
            log.info("SR unlearns the audit's class-%d trigger; the teacher's recorded target is %d",
                     attack_cfg.target, int(setup.attack.target))
    else:
        return None
    device = setup.device

    def stamp(x: torch.Tensor) -> torch.Tensor:  # the trigger's tensors live on the CPU
        return trigger(x.float().cpu()).to(device=device, dtype=x.dtype)

    return stamp


#: builds a run's defence from its job and set-up: ``None`` or an object with ``extensions``
#: (:class:`~kdguard.datafree.loop.DataFreeExtensions`) and ``summary()`` (``metrics.json``'s
#: ``abd`` entry), such as :class:`kdguard.abd.ABDPlugin`
ExtensionFactory = Callable[[DataFreeJob, DataFreeSetup], Any]


def run_datafree(job: DataFreeJob, *, extensions: DataFreeExtensions | ExtensionFactory | None = None,
                 threads: int | None = None) -> RunResult:
    """Distil ``job.teacher`` into a fresh student without training data; evaluate on the test split.

    Args:
        job: the configuration (see :mod:`kdguard.datafree.config`; build it with
            :func:`build_datafree_job` to get the presets and the ``abd`` section).
        extensions: the defence composed into the run: :class:`~kdguard.datafree.loop.DataFreeExtensions`
            (hooks used as given), or an :data:`ExtensionFactory` called with the job and its
            :class:`DataFreeSetup` once the method is built; ``None`` = :func:`abd_extensions`
            (ABD from ``job.abd``; nothing when ``abd.mode=off`` or the job has no ``abd`` section).
        threads: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Returns:
        :class:`kdguard.runs.RunResult` with the final test metrics (keys ``ca``, ``asr``,
        ``asr_all``, ``ra``, ``n_clean``, ``n_backdoor``, … plus ``seconds``, ``rounds``,
        ``method``). Re-running on the same ``out`` resumes from ``datafree_state.pt``.

    Raises:
        KDGuardError: bad configuration, unreadable teacher, unknown data set, a teacher that
            does not match the data set, or a method that cannot run on this teacher (e.g. BN
            matching without BatchNorm layers).
    """
    validate_datafree_job(job)
    run = RunContext.open(job, parents=("teacher",), threads=threads, device=job.device)
    out = run.out

    setup = prepare_datafree(job, device=run.device)
    teacher, t_manifest, test, student = setup.teacher, setup.teacher_manifest, setup.test, setup.student
    attack_cfg, attack, device, bf16, ctx = setup.attack_cfg, setup.attack, setup.device, setup.bf16, setup.ctx
    parts = build_method(job, ctx)
    eval_cfg = TrainConfig(device=job.device, amp=job.amp, channels_last=job.channels_last,
                           eval_batch_size=job.monitor.eval_batch_size, progress=False)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return evaluate_model(model, test, attack, train_cfg=eval_cfg).to_dict()

    abd = None
    if extensions is None or not isinstance(extensions, DataFreeExtensions):
        abd = (extensions or abd_extensions)(job, setup)
        extensions = abd.extensions if abd is not None else None
    loop = DataFreeLoop(parts.synthesizer, student, teacher, parts.objective,
                        rounds=job.schedule.rounds, student_steps=parts.student_steps,
                        batch_size=job.schedule.batch_size, optim=job.student_optim, device=device,
                        bf16=bf16, run_dir=out, evaluate=evaluate, monitor=job.monitor,
                        extensions=extensions, progress=job.progress, desc=f"datafree[{job.method}]")
    try:
        history = loop.run(stop_after=job.schedule.stop_after)
    finally:
        loop.close()
    abd_metrics = {} if abd is None else {"abd": {"mode": getattr(getattr(job, "abd", None), "mode", None),
                                                 **abd.summary()}}
    if loop.round < job.schedule.rounds:  # stopped early on purpose: the run continues later
        partial = dict(history[-1].eval) if history and history[-1].eval else {}
        partial.update(round=loop.round, rounds=job.schedule.rounds, finished=False, **abd_metrics)
        return RunResult(out, partial, student, run.elapsed())

    final = history[-1] if history and history[-1].round == job.schedule.rounds else None
    # the loop evaluates the last round anyway: reuse it (it is the model being saved)
    metrics = dict(final.eval) if final is not None and final.eval else \
        run.evaluate(student, test, attack, eval_cfg)
    metrics.update(seconds=run.elapsed(), method=job.method, rounds=job.schedule.rounds,
                   student_updates=job.schedule.rounds * parts.student_steps,
                   train_seconds=sum(r.seconds for r in history))
    metrics.update(abd_metrics)
    if final is not None and final.synthesis:
        metrics["synthesis"] = synthesis_summary(history)
    t_metrics = t_manifest.get("metrics") or run.evaluate(teacher, test, attack, eval_cfg)
    run.save(student, run.manifest("student", head={"method": f"datafree/{job.method}", "seed": job.seed},
                                   links={"teacher": str(job.teacher)}, model=student, dataset=test,
                                   attack=(attack_cfg, attack), metrics=metrics,
                                   tail={"teacher_metrics": t_metrics}))
    _write_report(run, job, t_manifest, t_metrics, metrics, history, attack, test)
    return RunResult(out, metrics, student, metrics["seconds"])


def _write_report(run: RunContext, job: DataFreeJob, t_manifest: dict[str, Any], t_metrics: dict[str, Any],
                  metrics: dict[str, Any], history: list[RoundRecord], attack, test) -> None:
    out = run.out
    notes = [f"Data-free method `{job.method}` (preset `{job.preset}`): {job.schedule.rounds} rounds, "
             f"{metrics['student_updates']} student updates of {job.schedule.batch_size} images; "
             "metrics of the last round."]
    abd = metrics.get("abd")
    if abd:
        parts = [f"ABD (`abd.mode={abd['mode']}`):"]
        if "sv" in abd:
            parts.append(f"Shuffling Vaccine {abd['sv']['status']} (coef {abd['sv']['coef']}, "
                         f"{abd['sv']['ensemble']} shuffled copies of layers {', '.join(abd['sv']['layers'])});")
        if "sr" in abd:
            parts.append(f"Self-Retrospection over the last {100 * abd['sr']['phase']:g} % of the rounds "
                         f"({abd['sr']['sr_steps']} unlearning steps, δ from the {abd['sr']['perturb_model']}).")
        notes += ["", " ".join(parts)]
    synth = metrics.get("synthesis")
    if synth:
        line = (f"Teacher's answers on the last interval's synthetic images: class {synth['top_class']} "
                f"on {100 * synth['top_share']:.1f} %, class entropy {synth['class_entropy']:.2f} (1 = uniform).")
        if synth["collapsed_intervals"]:
            line += (f" **Synthesis collapsed onto one class in {synth['collapsed_intervals']} of "
                     f"{synth['intervals']} log intervals** (first at round {synth['first_collapse_round']}): "
                     "the student learns little beyond that class, and a class the teacher answers on "
                     "noise-like images is a likely backdoor target (docs/datafree.md §5).")
        notes += ["", line]
    if plot_datafree_curves(out / "datafree_curves.png", history):
        notes += ["", "![CA/ASR over rounds](datafree_curves.png)"]
    grids = sorted(out.glob("synthetic_r*.png"))
    if grids:
        notes += ["", f"Synthetic images (round {int(grids[-1].stem[len('synthetic_r'):])}):", "",
                  f"![synthetic images]({grids[-1].name})"]
    t_arch = t_manifest.get("model", {}).get("arch", "?")
    run.report(title=f"Data-free distillation {t_arch} → {job.student} ({job.method}) on {test.name}",
               rows=[("teacher", t_arch, t_metrics), (f"student ({job.method})", job.student, metrics)],
               history={}, attack=attack, sample=test, notes="\n".join(notes))
