"""The scaffolding every data-available defence shares: load, split, train, evaluate, record.

:func:`prepare_defense` validates the job, opens its run directory (:class:`kdguard.runs.RunContext`),
loads the poisoned model and its attack from the run directory's manifest, loads the splits and
takes the defender's clean subset exactly as distillation does (:func:`kdguard.data.clean_subset`).
:func:`finish_defense` evaluates the defended model once on the test split and writes the same
artefacts as every other run (``model.safetensors``, ``manifest.json`` with role ``"defense"``,
``metrics.json`` with the usual keys, ``report.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..attacks import AttackSpec
from ..checkpoint import read_manifest
from ..config import AttackConfig, TrainConfig
from ..data import ImageDataset, SplitData, clean_subset, load_splits, make_augment
from ..errors import KDGuardError, check_range
from ..runs import RunContext, RunResult, dataset_model_spec, dataset_record, val_evaluator
from ..train import EpochRecord, Trainer
from .base import DEFENSES, Defense
from .config import AUTO_DATASET, DefenseJob


def _check_model_dir(job: DefenseJob) -> dict[str, Any]:
    manifest = read_manifest(job.model)  # raises for a missing path / directory without weights
    model_entry = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if not model_entry.get("arch") and not job.teacher_spec.arch:
        raise KDGuardError(f"model {job.model!r} has no manifest.json naming its architecture",
                           "point --model to a kdguard run directory, or pass --teacher-arch NAME "
                           "--num-classes K for a bare weights file")
    if Path(job.out).resolve() == Path(job.model).resolve():
        raise KDGuardError(f"out={job.out!r} is the poisoned model's own directory",
                           "write the defended model to another directory (out=...)")
    return manifest


@dataclass
class DefenseContext:
    """Everything a defence works with, prepared by :func:`prepare_defense`.

    Attributes:
        job: the job (with ``data.name`` resolved from the manifest when it was ``"auto"``).
        defense: the registry entry being run.
        run: the open run directory (:class:`kdguard.runs.RunContext`).
        data: train (without validation) / validation / test splits.
        clean: the defender's clean subset (uint8 images, int64 labels).
        model: the poisoned model, loaded in eval mode (defences may train it in place).
        manifest: the poisoned run's manifest.
        attack_cfg, attack: the attack used for evaluation (the manifest's unless ``job.attack``).
        poisoned_metrics: test metrics of the poisoned model (``ca``, ``asr``, ...).
    """

    job: DefenseJob
    defense: Defense
    run: RunContext
    data: SplitData
    clean: ImageDataset
    model: nn.Module
    manifest: dict[str, Any]
    attack_cfg: AttackConfig | None
    attack: AttackSpec | None
    poisoned_metrics: dict[str, Any]

    @property
    def out(self) -> Path:
        """The run directory."""
        return self.run.out

    @property
    def arch(self) -> str:
        return str(self.manifest.get("model", {}).get("arch", "?"))

    def val_evaluator(self, train_cfg: TrainConfig | None = None) -> Callable[[nn.Module], dict]:
        """Per-epoch validation CA/ASR for the curves (never the test split)."""
        return val_evaluator(self.data.val, self.attack, train_cfg or self.job.train)

    def trainer(self, module: nn.Module, *, run_dir: Path, desc: str,
                train_cfg: TrainConfig | None = None) -> Trainer:
        """A :class:`Trainer` on the clean subset's augmentation, resumable in ``run_dir``."""
        cfg = train_cfg or self.job.train
        return Trainer(module, cfg, run_dir=run_dir, augment=make_augment(self.job.data, self.clean),
                       evaluate=self.val_evaluator(cfg), seed=self.job.seed, desc=desc)

    def fit(self, module: nn.Module, *, run_dir: Path, desc: str, train_cfg: TrainConfig | None = None,
            setup: Callable[[Trainer], Any] | None = None) -> list[EpochRecord]:
        """Train ``module`` on the clean subset (``setup(trainer)`` runs before fitting)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = self.trainer(module, run_dir=run_dir, desc=desc, train_cfg=train_cfg)
        if setup is not None:
            setup(trainer)
        return trainer.fit(self.clean.images, self.clean.labels)

    def test_metrics(self, model: nn.Module) -> dict[str, Any]:
        """CA/ASR/ASR-all/RA and counts of ``model`` on the test split (one pass)."""
        return self.run.evaluate(model, self.data.test, self.attack, self.job.train)

    def spec(self, model: nn.Module) -> dict[str, Any]:
        """The manifest's ``model`` entry of ``model`` (trained on this dataset)."""
        return dataset_model_spec(model, self.data.train)

    def dataset_record(self) -> dict[str, Any]:
        """The manifest's ``dataset`` entry."""
        return dataset_record(self.data.train)


def prepare_defense(job: DefenseJob, *, threads: int | None = None) -> DefenseContext:
    """Validate ``job``, create its run directory and load everything the defence needs.

    ``threads``: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: unknown method; clean fraction outside (0, 1]; a model directory without a
            manifest; ``out`` equal to the model directory; a dataset whose class count differs
            from the model's; any data/attack configuration problem.
    """
    defense = DEFENSES.get(job.method)
    check_range("clean fraction", job.clean_fraction, 0.0, 1.0, low_open=True)
    manifest = _check_model_dir(job)
    if job.data.name == AUTO_DATASET:
        name = manifest.get("dataset", {}).get("name")
        if not name:
            raise KDGuardError(f"the manifest of {job.model!r} names no dataset", "pass data.name=NAME")
        job.data = replace(job.data, name=name)
    run = RunContext.open(job, parents=("model",), threads=threads)

    model, manifest = run.load_teacher(job.model, job.teacher_spec)
    data = load_splits(job.data, seed=job.seed)
    k_model = manifest["model"].get("num_classes")
    if k_model != data.train.num_classes:
        raise KDGuardError(f"model has {k_model} classes but dataset {data.train.name!r} has "
                           f"{data.train.num_classes}", "defend on the model's own dataset (data.name)")
    attack_cfg, attack = run.attack(job.attack, manifest, data.train.shape, data.train.num_classes)
    clean = clean_subset(data, job.clean_fraction, job.seed)
    ctx = DefenseContext(job=job, defense=defense, run=run, data=data, clean=clean, model=model,
                         manifest=manifest, attack_cfg=attack_cfg, attack=attack, poisoned_metrics={})
    same_setting = job.attack is None and manifest.get("dataset", {}).get("name") == data.train.name
    recorded = manifest.get("metrics") or {}
    ctx.poisoned_metrics = recorded if same_setting and "ca" in recorded else ctx.test_metrics(model)
    return ctx


Row = tuple[str, str, dict[str, Any]]


def finish_defense(ctx: DefenseContext, model: nn.Module, *, histories: dict[str, list[EpochRecord]],
                   extra_rows: Sequence[Row] = (), extra_manifest: dict[str, Any] | None = None,
                   notes: str = "") -> RunResult:
    """Evaluate the defended ``model`` on the test split and write the run's artefacts.

    ``metrics.json`` holds :class:`kdguard.metrics.BackdoorMetrics` keys (``ca``, ``asr``,
    ``asr_all``, ``ra``, ``n_clean``, ``n_backdoor``, ...) plus ``seconds``, ``n_defense`` (clean
    images used) and ``method``. The report's table has rows for the poisoned model,
    ``extra_rows`` (e.g. the NAD teacher) and the defended model.
    """
    job = ctx.job
    metrics = ctx.test_metrics(model)
    metrics["seconds"] = ctx.run.elapsed()
    metrics["n_defense"] = len(ctx.clean)
    metrics["method"] = ctx.defense.name
    ctx.run.save(model, ctx.run.manifest(
        "defense", head={"seed": job.seed},
        links={"defense": ctx.defense.needs(), "poisoned_model": str(job.model)},
        model=ctx.spec(model), dataset=ctx.dataset_record(), attack=(ctx.attack_cfg, ctx.attack),
        metrics=metrics, tail={"poisoned_metrics": ctx.poisoned_metrics, **(extra_manifest or {})}))
    arch = getattr(model, "arch", None) or ctx.arch
    rows = [("poisoned", ctx.arch, ctx.poisoned_metrics), *extra_rows,
            (f"defended ({ctx.defense.name})", arch, metrics)]
    intro = (f"Defence **{ctx.defense.title}** ({ctx.defense.source}) on `{job.model}` with "
             f"{len(ctx.clean)} labelled clean training images (clean_fraction={job.clean_fraction}).")
    ctx.run.report(title=f"Defence {ctx.defense.name} of {ctx.arch} on {ctx.data.train.name}",
                   rows=rows, history=histories, attack=ctx.attack, sample=ctx.data.test,
                   notes="\n\n".join(p for p in (intro, notes) if p))
    return RunResult(ctx.out, metrics, model, metrics["seconds"])
