"""Self-Retrospection settings on the demo's setting: one ZSKT run, SR variants of its last rounds.

The demo teacher (LeNet-5, BadNets grid 10 %, embedded MNIST, ``kdguard.jobs.demo.demo_jobs``) is
distilled by ZSKT for ``--rounds`` pseudo-batches (generator width 16, as the demo) and stopped
(checkpointed) where the SR phase would start. Each variant copies that checkpoint and finishes
the run with ``abd.mode=sr`` and its settings, so all variants share the first rounds exactly
and differ only in what SR does. With several ``--seeds`` (generator and student
initialisation, latent draws), each seed has its own shared run. CA/ASR of the last round are
printed as a Markdown table, per seed and as the mean (docs/abd-results.md §2).

With ``--prefix RUN ...`` the shared runs are given instead: run directories stopped where
their SR phase starts, e.g. the CIFAR-10 table's ``prefix_zskt_r1470_s0`` (continued with
``abd.mode=sr``) or ``prefix_zskt_sv_r1470_s0`` (continued with ``abd.mode=full``, i.e. SV
stays on). Each variant continues a copy with the run's own ``config.yaml``, so the table's
columns are those runs instead of seeds (docs/abd-cifar10.md).

    python benchmarks/abd_sr_sweep.py --out runs/abd_sr_sweep          # ~30 min on 2 busy cores
    python benchmarks/abd_sr_sweep.py --out runs/abd_sr_cifar --data-root ../shared/data \
        --prefix runs/bench_datafree_transfer/cifar10/badnets/prefix_zskt_sv_r1470_s0 --only "weight 0"
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from kdguard.jobs import build_datafree_job, fork_datafree_run, run_datafree, stopped_run_config, train_teacher
from kdguard.jobs.demo import demo_jobs
from kdguard.rundir import adopt_copy
from seed_table import seed_table, selected

#: name → extra overrides on top of abd.mode=sr (δ in normalised units unless stated)
VARIANTS = {
    "no unlearning (weight 0): the learning-rate reset alone": ["abd.sr.weight=0"],
    "reference reduction (batch), weight 1": [],
    "reference reduction, 2 perturbed samples (the reference's 2 % of 128)": ["abd.sr.min_count=2"],
    "reference reduction, weight 2": ["abd.sr.weight=2"],
    "reference reduction, weight 4": ["abd.sr.weight=4"],
    "reference reduction, perturbation step ×3 (inner_lr 0.3)": ["abd.sr.inner_lr=0.3"],
    "mean over perturbed samples (perturbed), weight 1": ["abd.sr.outer_reduction=perturbed"],
    "step ×3, δ against the student (perturb_model=student)": ["abd.sr.inner_lr=0.3",
                                                                 "abd.sr.perturb_model=student"],
    "step ×3, 20 inner steps": ["abd.sr.inner_lr=0.3", "abd.sr.inner_steps=20"],
    "step ×3, weight 2": ["abd.sr.inner_lr=0.3", "abd.sr.weight=2"],
    "step ×3, 32 perturbed samples": ["abd.sr.inner_lr=0.3", "abd.sr.min_count=32"],
    "step ×3, no hypergradient (plain adversarial unlearning)": ["abd.sr.inner_lr=0.3",
                                                                 "abd.sr.hypergradient=false"],
    "step ×3, λ = 0.1 (smaller δ)": ["abd.sr.inner_lr=0.3", "abd.sr.l2=0.1"],
    "step ×10 (inner_lr 1.0)": ["abd.sr.inner_lr=1.0"],
    # appended: the index names the cache directory
    "reference reduction, weight 3/10": ["abd.sr.weight=0.3"],  # not "0.3": --only "weight 0" must not match it
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/abd_sr_sweep")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--phase", type=float, default=0.05, help="SR share of the rounds")
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substrings) to run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--prefix", nargs="+", default=None, metavar="RUN",
                    help="continue these runs (stopped at their SR phase start) instead of the demo's")
    ap.add_argument("--data-root", default=None, help="with --prefix: the test set's folder (e.g. ../shared/data)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.prefix:
        sweep_prefixes(args, out)
        return
    t_job, _ = demo_jobs(out, progress=False)
    if not (out / "teacher" / "metrics.json").exists():
        train_teacher(t_job)
    start = args.rounds - max(1, round(args.phase * args.rounds))
    base = [f"teacher={out / 'teacher'}", "method=zskt", "preset=cpu", "student=lenet5",
            f"schedule.rounds={args.rounds}", "generator.width=16", "monitor.every=5",
            "monitor.grid_every=0", "monitor.checkpoint_every=10", "progress=false"]
    rows = []
    for v, name, extra in selected(VARIANTS, args.only):
        per_seed = []
        for seed in args.seeds:
            seeded = [*base, f"seed={seed}"]
            shared = out / f"zskt_shared_s{seed}"
            if not (shared / "datafree_state.pt").exists():
                run_datafree(build_datafree_job(None, seeded + [f"schedule.stop_after={start}", f"out={shared}"]))
            run_dir = out / f"sr_{v}_s{seed}"
            if not (run_dir / "metrics.json").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(shared, run_dir)
                job = build_datafree_job(None, seeded + ["abd.mode=sr", f"abd.sr.phase={args.phase}",
                                                         f"out={run_dir}", *extra])
                adopt_copy(run_dir, job, source=shared, parents=("teacher",))  # the copy continues as this variant
                t0 = time.perf_counter()
                run_datafree(job)
                (run_dir / "sweep_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            per_seed.append(json.loads((run_dir / "metrics.json").read_text()))
        rows.append((name, " ".join(extra) or "(defaults)", per_seed))
    seeds = ", ".join(map(str, args.seeds))
    print(f"\nZSKT {args.rounds} rounds; SR over rounds {start + 1}-{args.rounds}; seeds {seeds}\n")
    print(seed_table(rows, "SR variant"))


def prefix_mode(run: Path) -> str:
    """``abd.mode`` that continues ``run`` into its SR phase: ``full`` after an SV prefix, else ``sr``.

    Raises:
        KDGuardError: ``run`` is not a checkpointed data-free run (checked before any variant runs).
    """
    config = stopped_run_config(run)
    mode = ((yaml.safe_load(config.read_text()) or {}).get("abd") or {}).get("mode", "off")
    return "full" if mode in ("sv", "full") else "sr"


def sweep_prefixes(args: argparse.Namespace, out: Path) -> None:
    """The variants on given prefix runs (``--prefix``), one table column per run."""
    prefixes = [Path(p) for p in args.prefix]
    modes = [prefix_mode(p) for p in prefixes]
    rows = []
    for v, name, extra in selected(VARIANTS, args.only):
        per_run = []
        for prefix, mode in zip(prefixes, modes):
            run_dir = out / prefix.parent.name / f"{prefix.name}_sr_{v}"
            if not (run_dir / "metrics.json").exists():
                # the prefix stopped itself at the phase start; the copy runs to the end
                overrides = ["progress=false", f"abd.mode={mode}", "schedule.stop_after=null", *extra]
                if args.data_root:
                    overrides.append(f"data.root={args.data_root}")
                job = fork_datafree_run(prefix, run_dir, overrides)
                t0 = time.perf_counter()
                run_datafree(job)
                (run_dir / "sweep_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            per_run.append(json.loads((run_dir / "metrics.json").read_text()))
        rows.append((name, " ".join(extra) or "(defaults)", per_run))
    print("\nruns: " + ", ".join(f"{p} (abd.mode={m})" for p, m in zip(prefixes, modes)) + "\n")
    print(seed_table(rows, "SR variant", per="run"))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
