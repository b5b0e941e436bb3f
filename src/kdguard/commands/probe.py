"""``kdguard probe sv-premise|synthetic|sr-perturbation|target-share|target-bias``: the diagnostics of
:mod:`kdguard.diagnostics` on run directories, printed as Markdown tables (``--out`` also writes
JSON).

Example::

    kdguard probe sv-premise runs/teacher --data-root ../shared/data --layers 1 2 5
    kdguard probe synthetic runs/zskt --data-root ../shared/data
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import KDGuardError, check_positive
from ._app import app, command

probe_app = typer.Typer(no_args_is_help=True, help="Diagnostics that explain a measured transfer, on run "
                                                   "directories with a known trigger (not defences)")
app.add_typer(probe_app, name="probe")

RUNS = typer.Argument(..., help="Run directories")
DATA_ROOT = typer.Option(None, "--data-root", help="Directory holding the datasets (else $KDGUARD_DATA_ROOT)")
OUT = typer.Option(None, "--out", help="Also write the results as JSON to this file")


def _write(out: Optional[Path], results: Any) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


def _spread(values: list, scale: float = 1.0) -> str:
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "—"
    return f"{sum(vals) / len(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"


def _check_runs(runs: list[Path]) -> None:
    for run in runs:
        if not run.is_dir():
            raise KDGuardError(f"{run} is not a directory", "give kdguard run directories")


@command("sv-premise", group=probe_app)
def sv_premise_cmd(runs: list[Path] = RUNS, data_root: Optional[str] = DATA_ROOT,
                   n: int = typer.Option(2000, "--n", help="Non-target test images per teacher"),
                   shuffles: int = typer.Option(5, "--shuffles", help="Independent shuffles (ensembles)"),
                   layers: str = typer.Option("5", "--layers", help="Numbers of shuffled layers, comma-separated (1,2,5)"),
                   out: Optional[Path] = OUT) -> None:
    """Does ABD's Shuffling Vaccine flag a backdoored teacher's triggered images more than clean ones?"""
    from ..diagnostics import sv_premise

    _check_runs(runs)
    try:
        counts = [int(k) for k in layers.split(",") if k.strip()]
    except ValueError:
        raise KDGuardError(f"--layers {layers!r} is not a comma-separated list of integers", "write e.g. --layers 1,2,5") from None
    for name, value in (("--n", n), ("--shuffles", shuffles), *(("--layers", k) for k in counts)):
        check_positive(name, value)
    t0 = time.perf_counter()
    results = [sv_premise(r, data_root=data_root, n=n, shuffles=shuffles, layers=k) for r in runs for k in counts]
    typer.echo("| teacher | layers | images | T → target % | T̃ → target % | flagged % | flagged among T → target % "
                  "| median log10 D |\n|---|---|---|---|---|---|---|---|")
    for res in results:
        for name, r in res["rows"].items():
            typer.echo(f"| {Path(res['run']).name} | {res['layers']} | {name} | {100 * r['teacher_target_share']:.2f} | "
                          f"{_spread(r['shuffled_target_share'], 100)} | {_spread(r['flagged'], 100)} | "
                          f"{_spread(r['flagged_hits'], 100)} | {_spread(r['median_log10_div'])} |")
    typer.echo(f"\n{results[0]['n']} non-target test images per teacher, {shuffles} shuffles each (mean, range); "
                  f"the most layers shuffled: {results[-1]['shuffled_layers']}; {time.perf_counter() - t0:.0f} s")
    _write(out, results)


@command("synthetic", group=probe_app)
def synthetic_cmd(runs: list[Path] = RUNS, data_root: Optional[str] = DATA_ROOT,
                  n: int = typer.Option(2048, "--n", help="Images per row"), out: Optional[Path] = OUT) -> None:
    """What a data-free run's synthetic images show the teacher, beside real and noise images."""
    from ..diagnostics import synthetic_probe

    _check_runs(runs)
    check_positive("--n", n)
    results = [synthetic_probe(r, n=n, data_root=data_root) for r in runs]
    typer.echo("| run | round | images | teacher → target % | teacher p(target) | student → target % | "
                  "student = teacher % | teacher ASR with trigger % |\n|---|---|---|---|---|---|---|---|")
    for res in results:
        for name, r in res["rows"].items():
            asr = r.get("teacher_asr_with_trigger")
            typer.echo(f"| {Path(res['run']).name} | {res['round']} | {name} | {100 * r['teacher_target_share']:.1f} | "
                          f"{r['teacher_target_prob']:.3f} | {100 * r['student_target_share']:.1f} | "
                          f"{100 * r['agreement']:.1f} | {'—' if asr is None else f'{100 * asr:.1f}'} |")
    for res in results:
        typer.echo(f"{Path(res['run']).name}: {100 * res['rows']['synthetic']['outside_unit_range']:.1f} % of the "
                      "synthetic pixel values lie outside [0, 1] (clamped before the trigger is stamped)")
    typer.echo(f"chance {100 * results[0]['chance']:.1f} %")
    _write(out, results)


@command("sr-perturbation", group=probe_app)
def sr_perturbation_cmd(runs: list[Path] = RUNS, data_root: Optional[str] = DATA_ROOT,
                        batches: int = typer.Option(10, "--batches"), batch: int = typer.Option(128, "--batch"),
                        inner_steps: int = typer.Option(10, "--inner-steps"),
                        inner_lr: float = typer.Option(0.1, "--inner-lr"), l2: float = typer.Option(1e-3, "--l2"),
                        n_real: int = typer.Option(1000, "--n-real"), out: Optional[Path] = OUT) -> None:
    """What Self-Retrospection's universal perturbation does to the teacher at a data-free checkpoint."""
    from ..diagnostics import sr_perturbation_probe

    _check_runs(runs)
    for name, value in (("--batches", batches), ("--batch", batch), ("--inner-steps", inner_steps),
                        ("--inner-lr", inner_lr), ("--n-real", n_real)):
        check_positive(name, value)
    typer.echo("| run | round | batches whose δ → target | real test + δ → target | δ energy on trigger px "
                  "(their share) | max abs δ (pixels) |\n|---|---|---|---|---|---|")
    results = []
    for run in runs:
        r = sr_perturbation_probe(run, batches=batches, batch=batch, steps=inner_steps, lr=inner_lr, l2=l2,
                                  n_real=n_real, data_root=data_root)
        results.append(r)
        typer.echo(f"| {Path(r['run']).name} | {r['round']} | {100 * r['batches_to_target']:.0f} % | "
                      f"{100 * r['real_to_target']:.0f} % | {100 * r['trigger_energy']:.1f} % "
                      f"({100 * r['trigger_pixels']:.1f} %) | {r['max_abs_delta']:.2f} |")
    _write(out, results)


@command("target-share", group=probe_app)
def target_share_cmd(runs: list[Path] = RUNS, data_root: Optional[str] = DATA_ROOT,
                     temperature: float = typer.Option(4.0, "--temperature"),
                     target: Optional[int] = typer.Option(None, "--target", help="Default: the first run's attack"),
                     out: Optional[Path] = OUT) -> None:
    """How much of each model's non-true-class distribution on clean images points at the target."""
    from ..checkpoint import load_model, read_manifest
    from ..config import DataConfig
    from ..data import load_splits
    from ..diagnostics import target_share

    _check_runs(runs)
    check_positive("--temperature", temperature)
    first = read_manifest(runs[0])
    dataset = (first.get("dataset") or {}).get("name")
    if dataset is None:
        raise KDGuardError(f"{runs[0]}: the manifest names no dataset", "give kdguard run directories")
    attack = ((first.get("attack") or {}).get("config") or first.get("attack") or {})
    target = target if target is not None else attack.get("target")
    if target is None:
        raise KDGuardError(f"{runs[0]}: the manifest names no attack target", "pass --target K")
    data = load_splits(DataConfig(name=dataset, root=data_root), seed=0)
    if not 0 <= target < data.test.num_classes:
        raise KDGuardError(f"--target {target} is not a class of {dataset}",
                           f"give 0..{data.test.num_classes - 1}")
    keep = data.test.labels != target
    images, labels = data.test.images[keep], data.test.labels[keep]
    typer.echo(f"{len(labels)} clean test images of non-target classes; target {target}; τ = {temperature:g}; "
                  f"no preference = {1 / (data.test.num_classes - 1):.3f}\n")
    typer.echo("| model | target share of the non-true distribution | target is the top non-true class |\n"
                  "|---|---|---|")
    results = []
    for run in runs:
        share, top = target_share(load_model(run)[0], images, labels, int(target), temperature)
        results.append({"run": str(run), "target": int(target), "share": share, "top": top})
        typer.echo(f"| `{run}` | {share:.3f} | {100 * top:.1f} % |")
    _write(out, results)


@command("target-bias", group=probe_app)
def target_bias_cmd(runs: list[Path] = RUNS, data_root: Optional[str] = DATA_ROOT,
                    offsets: str = typer.Option("0,1,2,3,4", "--offsets",
                                                help="Offsets added to the target logit, comma-separated"),
                    attack_from: Optional[Path] = typer.Option(None, "--attack-from",
                                                               help="Take the attack from this run's manifest"),
                    out: Optional[Path] = OUT) -> None:
    """Is a low ASR an unlearned trigger or a suppressed target class? CA, target-class CA, ASR
    and no-trigger rate as the target logit is raised."""
    from ..diagnostics import target_bias

    _check_runs(runs)
    try:
        values = tuple(float(v) for v in offsets.split(",") if v.strip())
    except ValueError:
        raise KDGuardError(f"--offsets {offsets!r} is not a comma-separated list of numbers",
                           "write e.g. --offsets 0,1,2,3") from None
    if not values:
        raise KDGuardError("--offsets is empty", "write e.g. --offsets 0,1,2,3")
    results = [target_bias(r, offsets=values, data_root=data_root, attack_run=attack_from) for r in runs]
    typer.echo("| model | target-logit offset | CA % | target-class CA % | ASR % | no-trigger % |\n"
               "|---|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            typer.echo(f"| {Path(res['run']).name} | {row['offset']:g} | {100 * row['ca']:.1f} | "
                       f"{100 * row['target_ca']:.1f} | {100 * row['asr']:.1f} | {100 * row['asr_no_trigger']:.1f} |")
    _write(out, results)
