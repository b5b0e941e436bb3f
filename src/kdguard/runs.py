"""The run engine every job stands on: :class:`RunContext`.

A job (:mod:`kdguard.jobs`) opens its run directory with :meth:`RunContext.open` and then, in
the same few calls whatever it trains:

* :meth:`RunContext.open`: the job's settings checked (:func:`kdguard.train.settings.check_job`),
  the directory opened (:func:`kdguard.rundir.open_run`: ``~`` expanded, lock, fingerprint,
  ``--resume`` / ``--overwrite`` policy, ``config.yaml`` and ``run.json``), torch's thread count
  set and every generator seeded. ``threads`` and ``device`` are parameters of the context, so a
  caller (a benchmark pinning one thread) never patches the library.
* :meth:`RunContext.load_teacher` / :meth:`RunContext.attack`: the teacher and the attack to
  measure: the job's own ``attack`` section, else the one recorded in the teacher's manifest
  (read as data, :func:`kdguard.attacks.attack_from_manifest`).
* :meth:`RunContext.evaluate`: CA/ASR/ASR-all/RA on a test split (:func:`evaluate_model`).
* :meth:`RunContext.manifest` and :meth:`RunContext.save`: the manifest, built in this one place
  (:func:`build_manifest`), written with the weights and ``metrics.json``.
* :meth:`RunContext.report`: ``report.md`` with its table, curves and trigger preview.

Under torchrun (:mod:`kdguard.distributed`; jobs that opt in with ``distributed=True``) rank 0
alone opens the directory (lock, fingerprint, ``--resume`` / ``--overwrite``), evaluates and writes;
the other processes wait for it and receive the opened directory and the metrics
(:func:`kdguard.distributed.from_main`), and their :meth:`RunContext.save`,
:meth:`RunContext.write_metrics` and :meth:`RunContext.report` write nothing.

Each run directory holds ``config.yaml``, ``run.json``, ``manifest.json`` (versions, git commit,
seed, model spec, attack, metrics), ``model.safetensors``, ``metrics.json`` (final test metrics)
and ``report.md``, plus what the job adds (``train_state.pt``, ``metrics.jsonl``, ...). Test
metrics are computed once, at the end, on the last model: the test split never selects a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks import AttackSpec, attack_from_manifest, attack_record, backdoor_targets, make_attack, non_target_mask
from .checkpoint import load_teacher, model_spec, save_model
from .config import AttackConfig, TrainConfig, to_dict
from .data import ImageDataset
from .distributed import from_main, init, is_main, per_process_batch, refuse
from .io import write_json
from .metrics import BackdoorMetrics, evaluate_backdoor
from .runtime import configure_threads, resolve_device, seed_everything, use_bf16, use_channels_last

#: ``build_manifest(..., model=OMIT)``: the manifest has no such key (SSL encoders record theirs
#: in their own spec).
OMIT: Any = object()


@dataclass
class RunResult:
    """What a job returns: its run directory, final metrics, the trained model, wall seconds."""

    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    seconds: float


def evaluate_model(model: nn.Module, test: ImageDataset, attack: AttackSpec | None, *,
                   train_cfg: TrainConfig) -> BackdoorMetrics:
    """CA/ASR/ASR-all/RA of ``model`` on ``test`` under ``attack`` (one pass).

    Runs on ``train_cfg.device`` in fp32 unless ``train_cfg.amp`` is ``"on"`` (reported metrics
    must not depend on whether the CPU has bf16), batches of ``train_cfg.eval_batch_size``.
    """
    device = resolve_device(train_cfg.device)
    model.to(device)
    kw: dict[str, Any] = dict(batch_size=train_cfg.eval_batch_size, device=device,
                              bf16=str(train_cfg.amp).strip().lower() in ("on", "true") and use_bf16("on", device, model),
                              channels_last=use_channels_last(train_cfg.channels_last, device, model))
    if attack is None:
        return evaluate_backdoor(model, test.images, test.labels, **kw)
    return evaluate_backdoor(
        model, test.images, test.labels, trigger=attack.trigger,
        backdoor_target=backdoor_targets(test.labels, attack, test.num_classes),
        non_target=non_target_mask(test.labels, attack), **kw)


def val_evaluator(val: ImageDataset, attack: AttackSpec | None,
                  train_cfg: TrainConfig) -> Callable[[nn.Module], dict[str, float | None]]:
    """Per-epoch validation CA/ASR for the curves (never the test split): ``val_ca``, ``val_asr``."""
    def run(model: nn.Module) -> dict[str, float | None]:
        m = evaluate_model(model, val, attack, train_cfg=train_cfg)
        return {"val_ca": m.ca, "val_asr": m.asr}
    return run


def dataset_record(ds: ImageDataset) -> dict[str, Any]:
    """The manifest's ``dataset`` entry: name, ``[C, H, W]`` shape and class names."""
    return {"name": ds.name, "shape": list(ds.shape), "classes": list(ds.classes)}


def dataset_model_spec(model: nn.Module, ds: ImageDataset) -> dict[str, Any]:
    """:func:`kdguard.checkpoint.model_spec` of ``model`` trained on ``ds`` (classes, channels, input norm)."""
    return model_spec(model, num_classes=ds.num_classes, in_channels=ds.channels, mean=ds.mean, std=ds.std)


def build_manifest(role: str, job: Any, *, metrics: Any, head: Mapping[str, Any] | None = None,
                   links: Mapping[str, Any] | None = None, model: Any = OMIT, dataset: Any = OMIT,
                   attack: Any = OMIT, body: Mapping[str, Any] | None = None,
                   tail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of a run (without the environment, which :func:`save_model` adds).

    Keys, in this order: ``role``, ``head`` (e.g. ``method``, ``seed``), ``config`` (the resolved
    ``job``), ``links`` (the runs it read: ``teacher``, ``poisoned_model``, ...), ``model``,
    ``dataset``, ``attack``, ``body``, ``metrics``, ``tail`` (e.g. ``teacher_metrics``).

    Args:
        role: ``teacher``, ``student``, ``defense``, ``clean_encoder``, ...
        job: the job's structured config.
        metrics: the run's final metrics (those written to ``metrics.json``).
        model: an ``nn.Module`` (its spec is recorded; needs ``dataset`` as an
            :class:`ImageDataset`), a spec dict, or :data:`OMIT`.
        dataset: an :class:`ImageDataset` (:func:`dataset_record`), a record dict / None, or :data:`OMIT`.
        attack: ``(AttackConfig | None, AttackSpec | None)`` (:func:`kdguard.attacks.attack_record`),
            a record dict / None, or :data:`OMIT`.
    """
    manifest: dict[str, Any] = {"role": role, **(head or {}), "config": to_dict(job), **(links or {})}
    if model is not OMIT:
        manifest["model"] = dataset_model_spec(model, dataset) if isinstance(model, nn.Module) else model
    if dataset is not OMIT:
        manifest["dataset"] = dataset_record(dataset) if isinstance(dataset, ImageDataset) else dataset
    if attack is not OMIT:
        manifest["attack"] = attack_record(*attack) if isinstance(attack, tuple) else attack
    manifest.update(body or {})
    manifest["metrics"] = metrics
    manifest.update(tail or {})
    return manifest


def save_run(directory: Path, model: nn.Module, manifest: dict[str, Any], *,
             save: Callable[[Path, nn.Module, dict[str, Any]], Any] = save_model) -> None:
    """Write the weights and ``manifest.json`` into ``directory`` (with ``save``, default
    :func:`kdguard.checkpoint.save_model`), then ``metrics.json`` (the manifest's ``metrics``)."""
    save(directory, model, manifest)
    write_json(directory / "metrics.json", manifest["metrics"])


@dataclass
class RunContext:
    """One open run directory and the settings every step of the job shares.

    Attributes:
        out: the run directory (created, locked, ``config.yaml`` and ``run.json`` written).
        job: the job's structured config (recorded in the manifest).
        seed: the run's seed (Python, NumPy and torch were seeded with it).
        threads: torch's intra-op thread count set for this run.
        device: the resolved device of the job's device setting (None when the job has none).
        t0: ``time.perf_counter()`` when the context was opened.
    """

    out: Path
    job: Any
    seed: int
    threads: int
    device: torch.device | None = None
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, job: Any, *, seed: int | None = None, out: str | Path | None = None,
             parents: Iterable[str] = (), volatile: Iterable[str] = (), threads: int | None = None,
             device: str | None = None, device_setting: str = "device", t0: float | None = None,
             distributed: bool = False) -> RunContext:
        """Check ``job``, open its run directory, set threads and seeds.

        Args:
            job: the job's structured config (``job.out`` and ``job.seed`` are used unless given).
            seed: seeds Python, NumPy and torch (default ``job.seed``).
            out: the run directory (default ``job.out``; ``~`` expanded).
            parents: the job's fields naming the weights it reads (e.g. ``("teacher",)``): their
                files' sha256 are part of the run's identity.
            volatile: further dotted keys of ``job`` that do not change what the directory holds.
            threads: torch's intra-op threads; None = ``$KDGUARD_NUM_THREADS``, else every
                usable core (:func:`kdguard.runtime.configure_threads`).
            device: a device setting (``auto``, ``cpu``, ``cuda:0``) resolved into :attr:`device`.
            device_setting: the key named when ``device`` is not available here.
            t0: the job's start time (default: now).
            distributed: the job trains data-parallel when torchrun starts it with several
                processes (it has ``job.train.batch_size``; ``device`` picks gloo or NCCL); other
                jobs refuse to run under torchrun.

        Raises:
            KDGuardError: a bad training or device setting (:func:`kdguard.train.settings.check_job`),
                or see :func:`kdguard.rundir.open_run` (a bad ``out``, a directory in use or holding
                another run; ``--resume`` / ``--overwrite`` decide); under torchrun, a job that
                runs as one process only, or a batch that does not split over the processes.
        """
        from .rundir import open_run
        from .train.settings import check_job

        start = time.perf_counter() if t0 is None else t0
        check_job(job)  # before the directory is opened: a rejected job leaves nothing behind
        resolved = resolve_device(device, setting=device_setting) if device is not None else None
        if not distributed:
            refuse(f"job {type(job).__name__}")
        else:
            init(resolved or resolve_device("auto"))
            per_process_batch(job.train.batch_size)
        # under torchrun: rank 0 opens (and locks) it, the others wait for its path
        run_dir = from_main(lambda: open_run(job.out if out is None else out, job, parents=tuple(parents),
                                             volatile=tuple(volatile)))
        n = configure_threads(threads)
        seed = job.seed if seed is None else seed
        seed_everything(seed)
        return cls(run_dir, job, seed, n, resolved, start)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (rank 0 under torchrun, else always)."""
        return is_main()

    def elapsed(self) -> float:
        """Seconds since the job started (:attr:`t0`)."""
        return time.perf_counter() - self.t0

    # -- inputs ------------------------------------------------------------------------------------

    @staticmethod
    def load_teacher(path: str | Path, spec: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        """The teacher and its manifest (:func:`kdguard.checkpoint.load_teacher`; files read as data)."""
        return load_teacher(path, spec)

    @staticmethod
    def attack(cfg: AttackConfig | None, manifest: dict[str, Any] | None, shape: tuple[int, int, int],
               num_classes: int) -> tuple[AttackConfig | None, AttackSpec | None]:
        """The attack to measure: ``cfg`` (the job's), else the one ``manifest`` records.

        Returns:
            ``(config, spec)``; ``(None, None)`` when neither names an attack.

        Raises:
            KDGuardError: a malformed manifest record, or an attack :func:`kdguard.attacks.make_attack` refuses.
        """
        if cfg is None and manifest is not None:
            cfg = attack_from_manifest(manifest)
        return cfg, make_attack(cfg, shape, num_classes)

    # -- outputs -----------------------------------------------------------------------------------

    @staticmethod
    def evaluate(model: nn.Module, test: ImageDataset, attack: AttackSpec | None,
                 train_cfg: TrainConfig) -> dict[str, Any]:
        """Test metrics of ``model`` as a dict (:func:`evaluate_model`; under torchrun computed by
        rank 0 and sent to every process)."""
        return from_main(lambda: evaluate_model(model, test, attack, train_cfg=train_cfg).to_dict())

    def manifest(self, role: str, *, metrics: Any, **parts: Any) -> dict[str, Any]:
        """:func:`build_manifest` of this run's job."""
        return build_manifest(role, self.job, metrics=metrics, **parts)

    def save(self, model: nn.Module, manifest: dict[str, Any], *,
             save: Callable[[Path, nn.Module, dict[str, Any]], Any] = save_model) -> None:
        """:func:`save_run` into this run's directory (rank 0 only under torchrun)."""
        if self.writer:
            save_run(self.out, model, manifest, save=save)

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """``metrics.json`` of the run (written by rank 0 only under torchrun)."""
        if not self.writer:
            return self.out / "metrics.json"
        return write_json(self.out / "metrics.json", metrics)

    def report(self, **kw: Any) -> Path:
        """``report.md`` (:func:`kdguard.report.write_run_report`: ``title``, ``rows``, ``history``,
        ``attack``, ``sample``, ``notes``; written by rank 0 only under torchrun)."""
        from .report import write_run_report

        if not self.writer:
            return self.out / "report.md"
        return write_run_report(self.out, **kw)
