"""``run_datafree(job)``: teacher checkpoint → data-free student, with CA/ASR/RA at intervals.

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

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks import AttackSpec
from ..checkpoint import load_teacher, model_spec, save_model
from ..config import AttackConfig, TrainConfig, to_dict
from ..data import ImageDataset, load_dataset
from ..errors import KDGuardError
from ..io import write_json
from ..models import build_model
from ..pipeline import RunResult, attack_from_manifest, attack_record, evaluate_model, make_attack, prepare_run
from ..report import save_figure
from ..rundir import adopt_copy
from ..runtime import autocast, resolve_device, use_bf16, use_channels_last
from .config import DataFreeJob, build_datafree_job, validate_job
from .loop import STATE_FILE, DataFreeExtensions, DataFreeLoop, RoundRecord
from .methods import MethodContext, build_method, input_statistics

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


def fork_datafree_run(run_dir: str | Path, out: str | Path, overrides: list[str]) -> DataFreeJob:
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
    stopped_run_config(run_dir)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run_dir, out)
    job = build_datafree_job(out / "config.yaml", [f"out={out}", *overrides])
    # the copy is the new job's run now (its run.json says so, and where it was forked from)
    adopt_copy(out, job, source=run_dir, parents=("teacher",))
    return job


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


def prepare_datafree(job: DataFreeJob) -> DataFreeSetup:
    """Load the teacher and the test split, build the student and the method context of ``job``.

    Used by :func:`run_datafree` and by tools that restore a run (``benchmarks/synthetic_probe.py``).

    Raises:
        KDGuardError: unreadable teacher, no dataset named, or a teacher that does not match
            the dataset's classes or channels.
    """
    teacher, t_manifest = load_teacher(job.teacher, job.teacher_spec)
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
    attack_cfg = job.attack if job.attack is not None else attack_from_manifest(t_manifest)
    attack = make_attack(attack_cfg, test.shape, test.num_classes)

    device = resolve_device(job.device, setting="device")
    student = build_model(job.student, num_classes=test.num_classes, in_channels=test.channels,
                          mean=test.mean, std=test.std)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(device)
    bf16 = use_bf16(job.amp, device, student)
    if use_channels_last(job.channels_last, device, student):
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    mean, std = input_statistics(teacher, test.mean, test.std)
    ctx = MethodContext(teacher=teacher, student=student, image_shape=test.shape,
                        num_classes=test.num_classes, mean=mean, std=std, hflip=test.hflip,
                        device=device, bf16=bf16, seed=job.seed, data_root=job.data.root)
    return DataFreeSetup(teacher, t_manifest, test, attack_cfg, attack, student, device, bf16, ctx)


def run_datafree(job: DataFreeJob, *, extensions: DataFreeExtensions | None = None) -> RunResult:
    """Distil ``job.teacher`` into a fresh student without training data; evaluate on the test split.

    Args:
        job: the configuration (see :mod:`kdguard.datafree.config`; build it with
            :func:`~kdguard.datafree.config.build_datafree_job` to get the presets).
        extensions: defence hooks, see :class:`~kdguard.datafree.loop.DataFreeExtensions`;
            ``None`` builds ABD from ``job.abd`` (nothing when ``abd.mode=off``).

    Returns:
        :class:`kdguard.pipeline.RunResult` with the final test metrics (keys ``ca``, ``asr``,
        ``asr_all``, ``ra``, ``n_clean``, ``n_backdoor``, … plus ``seconds``, ``rounds``,
        ``method``). Re-running on the same ``out`` resumes from ``datafree_state.pt``.

    Raises:
        KDGuardError: bad configuration, unreadable teacher, unknown data set, a teacher that
            does not match the data set, or a method that cannot run on this teacher (e.g. BN
            matching without BatchNorm layers).
    """
    validate_job(job)
    t0 = time.perf_counter()
    out = prepare_run(job.out, job, job.seed, parents=("teacher",))

    setup = prepare_datafree(job)
    teacher, t_manifest, test, student = setup.teacher, setup.teacher_manifest, setup.test, setup.student
    attack_cfg, attack, device, bf16, ctx = setup.attack_cfg, setup.attack, setup.device, setup.bf16, setup.ctx
    parts = build_method(job, ctx)
    eval_cfg = TrainConfig(device=job.device, amp=job.amp, channels_last=job.channels_last,
                           eval_batch_size=job.monitor.eval_batch_size, progress=False)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        return evaluate_model(model, test, attack, train_cfg=eval_cfg).to_dict()

    abd = None
    if extensions is None and job.abd.mode != "off":
        from ..abd import build_abd

        abd = build_abd(job.abd, teacher=teacher, image_shape=test.shape, device=device,
                        method=job.method, seed=job.seed, input_std=ctx.std,
                        autocast=lambda: autocast(device, bf16))
        extensions = abd.extensions
    loop = DataFreeLoop(parts.synthesizer, student, teacher, parts.objective,
                        rounds=job.schedule.rounds, student_steps=parts.student_steps,
                        batch_size=job.schedule.batch_size, optim=job.student_optim, device=device,
                        bf16=bf16, run_dir=out, evaluate=evaluate, monitor=job.monitor,
                        extensions=extensions, progress=job.progress, desc=f"datafree[{job.method}]")
    try:
        history = loop.run(stop_after=job.schedule.stop_after)
    finally:
        loop.close()
    abd_metrics = {} if abd is None else {"abd": {"mode": job.abd.mode, **abd.summary()}}
    if loop.round < job.schedule.rounds:  # stopped early on purpose: the run continues later
        partial = dict(history[-1].eval) if history and history[-1].eval else {}
        partial.update(round=loop.round, rounds=job.schedule.rounds, finished=False, **abd_metrics)
        return RunResult(out, partial, student, time.perf_counter() - t0)

    final = history[-1] if history and history[-1].round == job.schedule.rounds else None
    # the loop evaluates the last round anyway: reuse it (it is the model being saved)
    metrics = dict(final.eval) if final is not None and final.eval else \
        evaluate_model(student, test, attack, train_cfg=eval_cfg).to_dict()
    metrics.update(seconds=time.perf_counter() - t0, method=job.method, rounds=job.schedule.rounds,
                   student_updates=job.schedule.rounds * parts.student_steps,
                   train_seconds=sum(r.seconds for r in history))
    metrics.update(abd_metrics)
    if final is not None and final.synthesis:
        metrics["synthesis"] = synthesis_summary(history)
    t_metrics = t_manifest.get("metrics") or evaluate_model(teacher, test, attack,
                                                            train_cfg=eval_cfg).to_dict()
    manifest = {
        "role": "student", "method": f"datafree/{job.method}", "seed": job.seed,
        "config": to_dict(job), "teacher": str(job.teacher),
        "model": model_spec(student, num_classes=test.num_classes, in_channels=test.channels,
                            mean=test.mean, std=test.std),
        "dataset": {"name": test.name, "shape": list(test.shape), "classes": list(test.classes)},
        "attack": attack_record(attack_cfg, attack), "metrics": metrics,
        "teacher_metrics": t_metrics,
    }
    save_model(out, student, manifest)
    write_json(out / "metrics.json", metrics)
    _write_report(out, job, t_manifest, t_metrics, metrics, history, attack, test)
    return RunResult(out, metrics, student, metrics["seconds"])


def _write_report(out: Path, job: DataFreeJob, t_manifest: dict[str, Any], t_metrics: dict[str, Any],
                  metrics: dict[str, Any], history: list[RoundRecord], attack, test) -> None:
    from ..report import write_run_report

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
    write_run_report(out, title=f"Data-free distillation {t_arch} → {job.student} ({job.method}) on {test.name}",
                     rows=[("teacher", t_arch, t_metrics), (f"student ({job.method})", job.student, metrics)],
                     history={}, attack=attack, sample=test, notes="\n".join(notes))
