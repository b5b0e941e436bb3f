"""Defences and KD losses against one poisoned teacher: CA, ASR and RA per clean-data share.

The measurement of issue 3: on CIFAR-10 with the foundation's poisoned ResNet-20 teacher
(BadNets 3×3 grid, 10 % dirty-label, target 0), with 5 % and 20 % clean training data:

* the ResNet-8 student trained on the clean share alone (``ce``, the control);
* a fresh ResNet-8 student distilled with each registered KD loss
  (``kdguard.distill.methods.KD_METHODS``: kd, at, fitnet, ..., via ``kdguard.jobs.distill``);
* the data-available defences FT, FP and NAD applied to the poisoned teacher itself
  (``kdguard.defenses.run_defense``).

The control ``ce`` trains the same student with cross-entropy on the clean share alone, so the
ASR that a student shows without anything passed on from the teacher (the trigger patch's own
pull towards the target class) is in the table too.

Every run has its own directory ``<out>/clean<pct>/<scratch|kd|defense>-<method>/``; a run whose
``metrics.json`` exists is not run again (delete the directory to redo it; use a new ``--out``
when changing epochs or recipes), and an interrupted run resumes from its ``train_state.pt``.
A run that fails is reported in the table and does not stop the others. The table is printed
and written to ``<out>/results.md`` (+ ``results.json``).

    python benchmarks/defenses_and_kd.py --teacher runs/bench_real/cifar10/teacher_resnet20_e60 \\
        --data-root ../shared/data --fractions 0.05 0.2 --kd-steps 1520 --out runs/bench_defenses

Recipes: KD students as the foundation benchmark's ResNet-8 student (SGD lr 0.1, Nesterov
momentum 0.9, wd 5e-4, cosine, batch 128, ``--epochs`` 80, or ``--kd-steps`` optimiser steps
whatever the clean share: 1520 steps are 80 epochs of 5 % CIFAR-10 and 20 of 20 %); defences with the defaults of
:class:`kdguard.defenses.DefenseJob` (20 epochs, batch 64, lr 0.01 cosine, Nesterov, wd 1e-4;
NAD teacher 10 epochs). ``--smoke`` checks the whole loop in a few minutes on CPU: it trains
its own 1-epoch LeNet-5 teacher on the embedded MNIST digits, and runs every method for 1 epoch
with a LeNet-5 student.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdguard.checkpoint import read_manifest
from kdguard.config import (AttackConfig, DataConfig, DistillJob, KDConfig, OptimConfig, TeacherJob,
                            TrainConfig)
from kdguard.data.batches import num_batches
from kdguard.defenses import DEFENSES, DefenseJob
from kdguard.jobs import run_defense
from kdguard.distill.methods import KD_METHODS
from kdguard.data import clean_subset, load_splits
from kdguard.jobs import distill, train_teacher


@dataclass
class Run:
    fraction: float
    kind: str          # "kd" (student distilled from the teacher) | "defense" (teacher repaired)
    method: str
    model: str
    out: Path
    metrics: dict[str, Any] | None = None
    error: str | None = None


#: the control: the student trained with cross-entropy on the clean share alone (logit KD with
#: α = 0, which never runs the teacher), i.e. the ASR a student shows without anything passed on
#: from the teacher
SCRATCH = "ce"


def method_kind(name: str) -> str:
    if name == SCRATCH:
        return "scratch"
    if name in DEFENSES:
        return "defense"
    if name in KD_METHODS or all(part in KD_METHODS for part in name.split("+")):
        return "kd"
    raise SystemExit(f"error: unknown method {name!r}; choose {SCRATCH!r} (student on CE alone), KD methods "
                     f"{', '.join(KD_METHODS.names())} or defences {', '.join(DEFENSES.names())}")


def smoke_teacher(out: Path) -> Path:
    """A 1-epoch BadNets LeNet-5 on the embedded MNIST digits (seconds on CPU)."""
    job = TeacherJob(data=DataConfig(name="mnist_embedded"), attack=AttackConfig(name="badnets", poison_rate=0.1),
                     model="lenet5", out=str(out / "teacher"),
                     train=TrainConfig(epochs=1, batch_size=64, progress=False))
    if not (Path(job.out) / "metrics.json").exists():
        train_teacher(job)
    return Path(job.out)


@functools.cache
def clean_size(dataset: str, root: str | None, fraction: float, seed: int) -> int:
    """Images in the clean share (loaded once per share, not once per method)."""
    return len(clean_subset(load_splits(DataConfig(name=dataset, root=root), seed=seed), fraction, seed))


def kd_epochs(args: argparse.Namespace, dataset: str, fraction: float) -> int:
    """``--epochs``, or the epochs that give ``--kd-steps`` optimiser steps on this clean share."""
    if args.kd_steps is None:
        return args.epochs
    n = clean_size(dataset, args.data_root, fraction, args.seed)
    # the trainer drops the last partial batch of every epoch
    return max(1, math.ceil(args.kd_steps / num_batches(n, min(args.batch_size, n), drop_last=True)))


def kd_job(args: argparse.Namespace, teacher: Path, dataset: str, fraction: float, method: str,
           out: Path) -> DistillJob:
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, schedule="cosine")
    return DistillJob(teacher=str(teacher), data=DataConfig(name=dataset, root=args.data_root),
                      student=args.student, clean_fraction=fraction,
                      kd=KDConfig(method="kd", alpha=0.0) if method == SCRATCH else KDConfig(method=method),
                      train=TrainConfig(epochs=kd_epochs(args, dataset, fraction), batch_size=args.batch_size, optim=sgd,
                                        progress=args.progress),
                      seed=args.seed, out=str(out))


def defense_job(args: argparse.Namespace, teacher: Path, dataset: str, fraction: float, method: str,
                out: Path) -> DefenseJob:
    job = DefenseJob(model=str(teacher), method=method, data=DataConfig(name=dataset, root=args.data_root),
                     clean_fraction=fraction, seed=args.seed, out=str(out))
    job.train.epochs = args.defense_epochs
    job.train.progress = args.progress
    if args.nad_teacher_epochs is not None:
        job.nad.teacher_epochs = args.nad_teacher_epochs
    return job


def execute(run: Run, job: Any) -> None:
    done = run.out / "metrics.json"
    if done.exists():
        run.metrics = json.loads(done.read_text())
        return
    try:
        result = run_defense(job) if run.kind == "defense" else distill(job)
        run.metrics = result.metrics
    except Exception as e:  # keep going: one broken method must not cost the whole table
        run.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (run.out / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (run.out / "error.txt").write_text(traceback.format_exc())


def pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def table(teacher: Path, teacher_metrics: dict[str, Any], runs: list[Run]) -> str:
    arch = read_manifest(teacher).get("model", {}).get("arch", "?")
    lines = ["| clean data | kind | method | model | CA % | ASR % | RA % | minutes |",
             "|---|---|---|---|---|---|---|---|",
             f"| — | poisoned teacher | — | {arch} | {pct(teacher_metrics.get('ca'))} | "
             f"{pct(teacher_metrics.get('asr'))} | {pct(teacher_metrics.get('ra'))} | — |"]
    for r in runs:
        if r.metrics is None:
            lines.append(f"| {r.fraction:.0%} | {r.kind} | {r.method} | {r.model} | failed: {r.error} | | | |")
            continue
        m = r.metrics
        minutes = f"{m['seconds'] / 60:.1f}" if m.get("seconds") is not None else "—"
        lines.append(f"| {r.fraction:.0%} | {r.kind} | {r.method} | {r.model} | {pct(m.get('ca'))} | "
                     f"{pct(m.get('asr'))} | {pct(m.get('ra'))} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="poisoned teacher run directory (e.g. runs/bench_real/cifar10/teacher)")
    ap.add_argument("--data-root", default=None, help="dataset root (else $KDGUARD_DATA_ROOT)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2],
                    help="clean shares of the whole training set")
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"KD methods and/or defences (default: {SCRATCH!r}, the student on CE alone, "
                         "then every KD method, then ft fp nad)")
    ap.add_argument("--student", default="resnet8", help="student architecture for the KD runs")
    ap.add_argument("--epochs", type=int, default=80, help="KD student epochs")
    ap.add_argument("--kd-steps", type=int, default=None,
                    help="instead of --epochs: the same number of optimiser steps for every clean share "
                         "(epochs = ceil(steps / batches per epoch)), so a larger share costs no more")
    ap.add_argument("--batch-size", type=int, default=128, help="KD student batch size")
    ap.add_argument("--defense-epochs", type=int, default=20, help="FT / FP fine-tuning / NAD student epochs")
    ap.add_argument("--nad-teacher-epochs", type=int, default=None, help="NAD teacher epochs (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_defenses")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny check: own 1-epoch LeNet-5 teacher on embedded MNIST, LeNet-5 student, 1 epoch")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if args.smoke:
        out = out / "smoke"
        args.student, args.epochs, args.batch_size = "lenet5", 1, 64
        args.defense_epochs, args.nad_teacher_epochs = 1, 1
        teacher = smoke_teacher(out)
    elif args.teacher:
        teacher = Path(args.teacher)
    else:
        ap.error("--teacher RUN_DIR is required (or --smoke)")
    manifest = read_manifest(teacher)
    dataset = manifest.get("dataset", {}).get("name")
    if not dataset:
        ap.error(f"{teacher} has no manifest naming its dataset")
    methods = args.methods or [SCRATCH, *KD_METHODS.names(), *DEFENSES.names()]
    kinds = {m: method_kind(m) for m in methods}

    t0 = time.perf_counter()
    runs: list[Run] = []
    for fraction in args.fractions:
        for method in methods:
            kind = kinds[method]
            run_dir = out / f"clean{fraction * 100:g}" / f"{kind}-{method}"
            build = defense_job if kind == "defense" else kd_job
            model = manifest["model"]["arch"] if kind == "defense" else args.student
            run = Run(fraction, kind, method, model, run_dir)
            print(f"== {kind} {method} with {fraction:.0%} clean data → {run_dir}", flush=True)
            execute(run, build(args, teacher, dataset, fraction, method, run_dir))
            runs.append(run)
    text = table(teacher, manifest.get("metrics") or {}, runs)
    header = (f"# Defences and KD losses vs. the poisoned {manifest['model']['arch']} on {dataset}\n\n"
              f"Teacher `{teacher}`; KD student {args.student} ("
              + (f"{args.kd_steps} optimiser steps at batch {args.batch_size}" if args.kd_steps
                 else f"{args.epochs} epochs") + "); defences "
              f"{args.defense_epochs} epochs. CA/ASR/RA on the test split (ASR over non-target classes).\n\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + text + "\n")
    (out / "results.json").write_text(json.dumps(
        [{"fraction": r.fraction, "kind": r.kind, "method": r.method, "model": r.model, "metrics": r.metrics,
          "error": r.error, "run_dir": str(r.out)} for r in runs], indent=2, default=str))
    print(text)
    print(f"\n{len(runs)} runs ({sum(r.error is not None for r in runs)} failed) in "
          f"{(time.perf_counter() - t0) / 60:.1f} min; table in {out / 'results.md'}")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
