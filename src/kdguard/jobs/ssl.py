"""The SSL track's jobs behind the CLI: pre-train (SimCLR), poison (BadEncoder), probe downstream,
and the distillation-defence study (:func:`run_grid`, :func:`run_defend`; see :mod:`kdguard.ssl.grid`).

Each job writes one run directory (``config.yaml``, ``train_state.pt`` while training,
``metrics.jsonl``, ``model.safetensors`` + ``manifest.json``, ``metrics.json``) and is skipped when
its directory already holds a finished result, so pipelines (the ``ssl`` suite) resume
stage by stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..distributed import from_main
from ..errors import KDGuardError
from ..io import read_json, write_json, write_text
from ..runs import RunContext
from ..runtime import resolve_device
from ..ssl.badencoder import run_badencoder, targets_from_manifest
from ..ssl.cache import cached_model, fingerprint
from ..ssl.config import BadEncoderJob, DefendJob, GridJob, PretrainJob, ProbeJob
from ..ssl.data import fraction_subset, load_split
from ..ssl.defense import distill_encoder, prepare_student, prepare_teacher
from ..ssl.downstream import build_targets, evaluate_downstream, load_downstream, probe_table, summarize
from ..ssl.encoder import (Encoder, SSLModel, build_ssl_model, clone_model, is_ssl_checkpoint, load_ssl_model,
                           save_ssl_model)
from ..ssl.grid import Cell, cached_probe, fingerprint_indices, grid_cells, grid_table, grid_row
from ..ssl.loop import STATE_FILE
from ..ssl.probe import knn_accuracy
from ..ssl.simclr import train_simclr


@dataclass
class SSLResult:
    """What a job produced: its run directory, metrics and (for training jobs) the model."""

    run_dir: Path
    metrics: dict[str, Any]
    model: SSLModel | None = None


def _finished(out: str | Path, job: Any) -> SSLResult | None:
    """The finished result in ``out`` if it was made by ``job``; ``None`` if there is none yet or
    ``job`` only asks for more epochs (training then continues from ``train_state.pt``).

    Raises:
        KDGuardError: ``out`` holds a run made with other settings.
    """
    out = Path(out)
    if not (is_ssl_checkpoint(out) and (out / "metrics.json").exists()):
        return None
    model, manifest = load_ssl_model(out)
    saved, wanted = manifest.get("config") or {}, to_dict(job)
    if saved == wanted:
        return SSLResult(out, read_json(out / "metrics.json"), model)
    longer = ({**saved, "train": {**saved.get("train", {}), "epochs": None}}
              == {**wanted, "train": {**wanted["train"], "epochs": None}}
              and wanted["train"]["epochs"] > saved.get("train", {}).get("epochs", 0))
    if longer and (out / STATE_FILE).exists():
        return None
    raise KDGuardError(f"run directory {str(out)!r} holds a run made with other settings",
                       "use a fresh out= directory (only train.epochs may grow: training then continues)")


def _last_losses(history: list) -> dict[str, float]:
    return dict(history[-1].losses) if history else {}


def run_pretrain(job: PretrainJob, *, threads: int | None = None) -> SSLResult:
    """SimCLR pre-training of a clean encoder on ``job.data``'s training split.

    Writes the clean encoder (``role: clean_encoder``) and ``metrics.json`` with the last epoch's
    loss, the wall time and, if ``knn_k > 0``, the kNN monitor accuracy on the test split (memory
    bank: the training images used). A finished run directory is returned as is. ``threads``:
    torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: unknown dataset/architecture, missing data, or training errors.
    """
    # first: --overwrite empties the directory; runs data-parallel under torchrun
    run = RunContext.open(job, threads=threads, device=job.train.device, device_setting="train.device",
                          distributed=True)
    out = run.out
    done = _finished(out, job)
    if done is not None:
        return done
    train = load_split(job.data.name, "train", job.data.root, limit=job.data.limit, seed=job.seed)
    model = build_ssl_model(job.encoder.arch, train.shape, mean=train.mean, std=train.std,
                            proj_hidden=job.encoder.proj_hidden, proj_dim=job.encoder.proj_dim,
                            options=dict(job.encoder.options), seed=job.seed)
    history = train_simclr(model, train.images, job.train, augment=job.augment.build(),
                           temperature=job.temperature, run_dir=out, seed=job.seed, desc="simclr")
    metrics: dict[str, Any] = {"loss": _last_losses(history).get("simclr"), "epochs": job.train.epochs,
                               "n_train": len(train)}
    if job.knn_k > 0:
        test = load_split(job.data.name, "test", job.data.root)
        metrics["knn_acc"] = from_main(lambda: knn_accuracy(model.encoder, train, test, k=job.knn_k,
                                                            device=resolve_device(job.train.device)))
    metrics["seconds"] = run.elapsed()
    run.save(model, run.manifest("clean_encoder", head={"seed": job.seed},
                                 dataset={"name": train.name, "shape": list(train.shape)}, metrics=metrics),
             save=save_ssl_model)
    return SSLResult(out, metrics, model)


def run_badencoder_job(job: BadEncoderJob, *, threads: int | None = None) -> SSLResult:
    """BadEncoder on the clean encoder ``job.encoder``; writes the poisoned encoder.

    The manifest (``role: poisoned_encoder``) records every target (dataset, class, trigger
    parameters), which :func:`run_probe_job`, the defence and the grid read back. ``metrics.json``
    holds the last epoch's ``l0``, ``l1``, ``l2`` (weighted). A trigger preview PNG per target is
    written next to it. ``threads``: torch's intra-op threads for the run (None: the default).

    Raises:
        KDGuardError: the encoder is not an SSL checkpoint, bad targets, or training errors.
    """
    run = RunContext.open(job, parents=("encoder",), threads=threads)  # first: --overwrite empties it
    out = run.out
    done = _finished(out, job)
    if done is not None:
        return done
    clean, clean_manifest = load_ssl_model(job.encoder, job.teacher_spec)
    shape = tuple(clean.encoder.input_shape)
    shadow = load_split(job.shadow.name, "train", job.shadow.root, shape, limit=job.shadow.limit, seed=job.seed)
    targets = build_targets(job.targets, shape, root=job.shadow.root, seed=job.seed)
    model = clone_model(clean)
    history = run_badencoder(model, clean, shadow.images, targets, job.train, lambda1=job.lambda1,
                             lambda2=job.lambda2, augment_references=job.augment_references,
                             freeze_bn=job.freeze_bn, reference_augment=job.augment.build(crop=False),
                             run_dir=out, seed=job.seed)
    metrics = {**_last_losses(history), "epochs": job.train.epochs, "n_shadow": len(shadow),
               "seconds": run.elapsed()}
    run.save(model, run.manifest("poisoned_encoder", head={"seed": job.seed},
                                 links={"clean_encoder": str(job.encoder)}, dataset=clean_manifest.get("dataset"),
                                 body={"targets": [t.record() for t in targets]}, metrics=metrics),
             save=save_ssl_model)
    from ..report import plot_trigger_preview
    for i, t in enumerate(targets):
        plot_trigger_preview(out / f"trigger_preview_{i}_{t.dataset}.png", shadow, t.trigger)
    return SSLResult(out, metrics, model)


def run_probe_job(job: ProbeJob, *, threads: int | None = None) -> SSLResult:
    """Downstream CA / ASR of the encoder ``job.encoder`` on ``job.datasets``.

    The backdoor targets are ``job.targets`` if given, else those recorded in the encoder's
    manifest (none for a clean encoder: CA only). Writes ``probe.json`` and ``probe.md``.
    ``threads``: torch's intra-op threads for the run (None: the default).

    Raises:
        KDGuardError: not an SSL checkpoint, unknown datasets or triggers.
    """
    out = RunContext.open(job, parents=("encoder",), threads=threads).out
    model, manifest = load_ssl_model(job.encoder, job.teacher_spec)
    shape = tuple(model.encoder.input_shape)
    targets = (build_targets(job.targets, shape, root=job.root, with_references=False) if job.targets
               else targets_from_manifest(manifest))
    downstream = load_downstream(list(job.datasets), job.root, shape)
    results = evaluate_downstream(model.encoder, downstream, targets, job.probe, seed=job.seed)
    metrics = {"encoder": str(job.encoder), "results": results, **summarize(results)}
    write_json(out / "probe.json", metrics)
    write_text(out / "probe.md", probe_table([(Path(job.encoder).name, results)], list(job.datasets)) + "\n")
    return SSLResult(out, metrics, model)


@dataclass
class GridResult:
    """What :func:`run_grid` produced: its run directory, the table's rows and the Markdown table."""

    run_dir: Path
    rows: list[dict[str, Any]]
    table: str


def run_grid(job: GridJob, *, threads: int | None = None) -> GridResult:
    """Run the teacher × student × loss study (or a subset) on a poisoned encoder (:mod:`kdguard.ssl.grid`).

    ``threads``: torch's intra-op threads for the run (None: ``$KDGUARD_NUM_THREADS``, else all cores).

    Raises:
        KDGuardError: unknown component names, a checkpoint that is not an SSL encoder, a cache
            built with other settings, missing data.
    """
    t_start = time.perf_counter()
    cells = grid_cells(list(job.teachers), list(job.students), list(job.losses), job.cells)
    # every cell, probe and prepared model below is cached with (and checked against) its own
    # settings, so which of them a run selects does not make the directory another run
    out = RunContext.open(job, parents=("encoder", "clean_encoder"), threads=threads,
                          volatile=("teachers", "students", "losses", "cells", "probe_teachers",
                                    "probe_students", "datasets", "asr_goal", "ca_cost_goal")).out
    poisoned, manifest = load_ssl_model(job.encoder, job.teacher_spec)
    clean_model = load_ssl_model(job.clean_encoder)[0] if job.clean_encoder else None  # fail before probing
    targets = targets_from_manifest(manifest)
    shape = tuple(poisoned.encoder.input_shape)
    pool = load_split(job.data.name, "train", job.data.root, shape, limit=job.data.limit, seed=job.seed)
    clean, indices = fraction_subset(pool, job.defense.clean_fraction, job.seed)
    write_json(out / "clean_subset.json", {"dataset": pool.name, "pool_size": len(pool),
                                           "indices": indices.tolist()})
    datasets = list(job.datasets)
    downstream = load_downstream(datasets, job.data.root, shape)
    identity = {"encoder": fingerprint(poisoned), "clean_indices": fingerprint_indices(indices),
                "pool": len(pool), "data": job.data}

    def probe(directory: Path, encoder: Encoder) -> dict:
        return cached_probe(directory, encoder, downstream, targets, job.probe, job.seed)

    poisoned_results = probe(out / "baselines" / "poisoned", poisoned.encoder)
    reference = summarize(poisoned_results)
    rows = [grid_row("poisoned encoder", "baseline", poisoned_results, None, job)]
    if clean_model is not None:
        rows.insert(0, grid_row("clean encoder", "baseline", probe(out / "baselines" / "clean", clean_model.encoder),
                            reference, job))
    prep = out / "prep"
    teachers = {}
    for kind in dict.fromkeys(c.teacher for c in cells):
        teachers[kind] = prepare_teacher(kind, poisoned, clean.images, job.defense, cache=prep, seed=job.seed,
                                         identity=identity)
        if job.probe_teachers and kind != "poisoned":
            rows.append(grid_row(f"teacher: {kind}", "teacher",
                             probe(prep / f"teacher_{kind}", teachers[kind].encoder), reference, job))
    if job.probe_students and any(c.student == "warmup" for c in cells):
        # separates what SimCLR on the clean subset does alone from what the distillation adds
        warm = prepare_student("warmup", poisoned, clean.images, job.defense, cache=prep, seed=job.seed,
                               identity=identity)
        rows.append(grid_row("student: warmup (before distillation)", "student",
                         probe(prep / "student_warmup", warm.encoder), reference, job))
    for cell in cells:
        teacher = teachers[cell.teacher]
        settings = {**identity, "cell": cell.name, "seed": job.seed, "defense": job.defense,
                    "teacher_kind": cell.teacher, "student_kind": cell.student}

        def build(d: Path, cell: Cell = cell, teacher=teacher):
            student = prepare_student(cell.student, poisoned, clean.images, job.defense, cache=prep,
                                      seed=job.seed, identity=identity)
            distill_encoder(student, teacher, clean.images, cell.loss, job.defense, run_dir=d, seed=job.seed,
                            desc=f"distill[{cell.name}]")
            return student

        defended = cached_model(out / "cells" / cell.name, settings, build, "defended_encoder")
        rows.append(grid_row(cell.name, "cell", probe(out / "cells" / cell.name, defended.encoder), reference,
                         job, cell))
    table = grid_table(rows, datasets)
    write_text(out / "grid.md", table + "\n")
    write_json(out / "grid.json", {"config": to_dict(job), "rows": rows, "seconds": time.perf_counter() - t_start,
                                   "asr_goal": job.asr_goal, "ca_cost_goal": job.ca_cost_goal})
    return GridResult(out, rows, table)


def run_defend(job: DefendJob, *, threads: int | None = None) -> GridResult:
    """One defence run (a single cell of the grid) plus the poisoned encoder's reference row."""
    grid = GridJob(encoder=job.encoder, teacher_spec=job.teacher_spec, data=job.data, teachers=[job.teacher], students=[job.student],
                   losses=[job.loss], cells="factorial", probe_teachers=False, probe_students=False,
                   defense=job.defense, datasets=list(job.datasets), probe=job.probe, seed=job.seed, out=job.out)
    return run_grid(grid, threads=threads)
