"""The SSL track's jobs behind the CLI: pre-train (SimCLR), poison (BadEncoder), probe downstream.

Each job writes one run directory (``config.yaml``, ``train_state.pt`` while training,
``metrics.jsonl``, ``model.safetensors`` + ``manifest.json``, ``metrics.json``) and is skipped when
its directory already holds a finished result, so pipelines (``benchmarks/ssl_track.py``) resume
stage by stage. The defence and the grid are in :mod:`kdguard.ssl.grid`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..attacks.triggers import build_trigger
from ..config import to_dict
from ..data import ImageDataset
from ..errors import KDGuardError
from ..io import read_json, write_json, write_text
from ..pipeline import prepare_run
from ..runtime import resolve_device
from .badencoder import BackdoorTarget, run_badencoder, select_references, targets_from_manifest
from .config import BadEncoderJob, PretrainJob, ProbeConfig, ProbeJob, TargetConfig
from .data import load_split
from .encoder import Encoder, SSLModel, build_ssl_model, clone_model, is_ssl_checkpoint, load_ssl_model, save_ssl_model
from .loop import STATE_FILE
from .probe import knn_accuracy, probe_encoder
from .simclr import train_simclr


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


def run_pretrain(job: PretrainJob) -> SSLResult:
    """SimCLR pre-training of a clean encoder on ``job.data``'s training split.

    Writes the clean encoder (``role: clean_encoder``) and ``metrics.json`` with the last epoch's
    loss, the wall time and, if ``knn_k > 0``, the kNN monitor accuracy on the test split (memory
    bank: the training images used). A finished run directory is returned as is.

    Raises:
        KDGuardError: unknown dataset/architecture, missing data, or training errors.
    """
    t0 = time.perf_counter()
    out = prepare_run(job.out, job, job.seed)  # first: --overwrite empties the directory
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
        metrics["knn_acc"] = knn_accuracy(model.encoder, train, test, k=job.knn_k,
                                          device=resolve_device(job.train.device))
    metrics["seconds"] = time.perf_counter() - t0
    save_ssl_model(out, model, {"role": "clean_encoder", "seed": job.seed, "config": to_dict(job),
                                "dataset": {"name": train.name, "shape": list(train.shape)},
                                "metrics": metrics})
    write_json(out / "metrics.json", metrics)
    return SSLResult(out, metrics, model)


def build_targets(configs: list[TargetConfig], input_shape: tuple[int, int, int], *, root: str | None,
                  seed: int = 0, with_references: bool = True) -> list[BackdoorTarget]:
    """Backdoor targets from their configs: the trigger at the encoder's input shape and, if asked,
    ``references`` images of the target class from the downstream train split (converted).

    Raises:
        KDGuardError: unknown dataset/trigger/parameter, a class outside the dataset.
    """
    targets = []
    for i, tc in enumerate(configs):
        trigger = build_trigger(tc.trigger, tuple(input_shape), seed=tc.trigger_seed, **dict(tc.trigger_params))
        refs = None
        if with_references:
            ds = load_split(tc.dataset, "train", tc.root or root, input_shape)
            refs = select_references(ds, tc.target, tc.references, seed=seed + i)
            name = ds.name
        else:
            name = tc.dataset
        targets.append(BackdoorTarget(name, int(tc.target), trigger, refs))
    return targets


def run_badencoder_job(job: BadEncoderJob) -> SSLResult:
    """BadEncoder on the clean encoder ``job.encoder``; writes the poisoned encoder.

    The manifest (``role: poisoned_encoder``) records every target (dataset, class, trigger
    parameters), which :func:`run_probe_job`, the defence and the grid read back. ``metrics.json``
    holds the last epoch's ``l0``, ``l1``, ``l2`` (weighted). A trigger preview PNG per target is
    written next to it.

    Raises:
        KDGuardError: the encoder is not an SSL checkpoint, bad targets, or training errors.
    """
    t0 = time.perf_counter()
    out = prepare_run(job.out, job, job.seed, parents=("encoder",))  # first: --overwrite empties it
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
               "seconds": time.perf_counter() - t0}
    save_ssl_model(out, model, {"role": "poisoned_encoder", "seed": job.seed, "config": to_dict(job),
                                "clean_encoder": str(job.encoder),
                                "dataset": clean_manifest.get("dataset"),
                                "targets": [t.record() for t in targets], "metrics": metrics})
    write_json(out / "metrics.json", metrics)
    from ..report import plot_trigger_preview
    for i, t in enumerate(targets):
        plot_trigger_preview(out / f"trigger_preview_{i}_{t.dataset}.png", shadow, t.trigger)
    return SSLResult(out, metrics, model)


# --- downstream evaluation ------------------------------------------------------------------------

Downstream = dict[str, tuple[ImageDataset, ImageDataset]]


def load_downstream(names: list[str], root: str | None, input_shape: tuple[int, int, int]) -> Downstream:
    """Train and test splits of each downstream dataset, converted to the encoder's input shape.

    Raises:
        KDGuardError: no dataset named, or a dataset that cannot be loaded.
    """
    if not names:
        raise KDGuardError("no downstream dataset given", "set datasets=[cifar10,gtsrb]")
    return {name: (load_split(name, "train", root, input_shape), load_split(name, "test", root, input_shape))
            for name in names}


def target_map(targets: list[BackdoorTarget]) -> dict[str, BackdoorTarget]:
    """Dataset name → its (first) backdoor target; names compare case-insensitively."""
    out: dict[str, BackdoorTarget] = {}
    for t in targets:
        out.setdefault(t.dataset.lower(), t)
    return out


def evaluate_downstream(encoder: Encoder, downstream: Downstream, targets: list[BackdoorTarget],
                        cfg: ProbeConfig, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Probe ``encoder`` on every downstream dataset: ``{name: ProbeResult dict}``.

    Datasets with a backdoor target get ASR/ASR-all; the others CA only.
    """
    by_name = target_map(targets)
    results = {}
    for name, (train, test) in downstream.items():
        target = by_name.get(train.name.lower()) or by_name.get(name.lower())
        results[name] = probe_encoder(encoder, train, test, target=target, cfg=cfg, seed=seed).to_dict()
    return results


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Means over datasets: ``mean_ca`` (all), ``mean_asr`` and ``mean_asr_all`` (attacked ones)."""
    cas = [r["ca"] for r in results.values()]
    asrs = [r["asr"] for r in results.values() if r.get("asr") is not None]
    alls = [r["asr_all"] for r in results.values() if r.get("asr_all") is not None]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"mean_ca": mean(cas), "mean_asr": mean(asrs), "mean_asr_all": mean(alls)}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def probe_table(rows: list[tuple[str, dict[str, dict[str, Any]]]], datasets: list[str]) -> str:
    """Markdown table: one row per encoder, ``CA / ASR / ASR-all`` (%) per dataset and the means."""
    head = "| encoder | " + " | ".join(f"{d} CA / ASR / ASR-all %" for d in datasets) + \
        " | mean CA % | mean ASR % |"
    lines = [head, "|---" * (len(datasets) + 3) + "|"]
    for label, results in rows:
        cells = []
        for d in datasets:
            r = results.get(d)
            cells.append("—" if r is None else f"{_pct(r['ca'])} / {_pct(r.get('asr'))} / {_pct(r.get('asr_all'))}")
        s = summarize(results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(s['mean_ca'])} | {_pct(s['mean_asr'])} |")
    return "\n".join(lines)


def run_probe_job(job: ProbeJob) -> SSLResult:
    """Downstream CA / ASR of the encoder ``job.encoder`` on ``job.datasets``.

    The backdoor targets are ``job.targets`` if given, else those recorded in the encoder's
    manifest (none for a clean encoder: CA only). Writes ``probe.json`` and ``probe.md``.

    Raises:
        KDGuardError: not an SSL checkpoint, unknown datasets or triggers.
    """
    out = prepare_run(job.out, job, job.seed, parents=("encoder",))
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

