"""Self-Retrospection settings on the demo's setting: one ZSKT run, SR variants of its last rounds.

The demo teacher (LeNet-5, BadNets grid 10 %, embedded MNIST, ``kdguard.demo.demo_jobs``) is
distilled by ZSKT for ``--rounds`` pseudo-batches (generator width 16, as the demo) and stopped
(checkpointed) where the SR phase would start. Each variant copies that checkpoint and finishes
the run with ``abd.mode=sr`` and its settings, so all variants share the first rounds exactly
and differ only in what SR does. CA/ASR of the last round are printed as a Markdown table
(docs/abd.md §4).

    python benchmarks/abd_sr_sweep.py --out runs/abd_sr_sweep          # ~30 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kdguard.datafree import build_datafree_job, run_datafree
from kdguard.demo import demo_jobs
from kdguard.pipeline import train_teacher

#: name → extra overrides on top of abd.mode=sr (δ in normalised units unless stated)
VARIANTS = {
    "no unlearning (weight 0): the learning-rate reset alone": ["abd.sr.weight=0"],
    "reference reduction (batch), weight 1": [],
    "reference reduction, 2 perturbed samples (the reference's 2 % of 128)": ["abd.sr.min_count=2"],
    "reference reduction, weight 2": ["abd.sr.weight=2"],
    "reference reduction, weight 4": ["abd.sr.weight=4"],
    "reference reduction, perturbation step ×3 (inner_lr 0.3)": ["abd.sr.inner_lr=0.3"],
    "mean over perturbed samples (perturbed), weight 1": ["abd.sr.outer_reduction=perturbed"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/abd_sr_sweep")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--phase", type=float, default=0.05, help="SR share of the rounds")
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substrings) to run")
    args = ap.parse_args()
    out = Path(args.out)
    t_job, _ = demo_jobs(out, progress=False)
    if not (out / "teacher" / "metrics.json").exists():
        train_teacher(t_job)
    start = args.rounds - max(1, round(args.phase * args.rounds))
    base = [f"teacher={out / 'teacher'}", "method=zskt", "preset=cpu", "student=lenet5",
            f"schedule.rounds={args.rounds}", "generator.width=16", "monitor.every=5",
            "monitor.grid_every=0", "monitor.checkpoint_every=10", "progress=false"]
    shared = out / "zskt_shared"
    run_datafree(build_datafree_job(None, base + [f"schedule.stop_after={start}", f"out={shared}"]))
    rows = []
    for name, extra in VARIANTS.items():
        if args.only and not any(k in name for k in args.only):
            continue
        run_dir = out / f"sr_{len(rows)}"
        if not (run_dir / "metrics.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(shared, run_dir)
            t0 = time.perf_counter()
            run_datafree(build_datafree_job(None, base + ["abd.mode=sr", f"abd.sr.phase={args.phase}",
                                                          f"out={run_dir}", *extra]))
            (run_dir / "sweep_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        m = json.loads((run_dir / "metrics.json").read_text())
        rows.append((name, " ".join(extra) or "(defaults)", m))
    print(f"\nZSKT {args.rounds} rounds; SR over rounds {start + 1}-{args.rounds}\n")
    print("| SR variant | overrides | CA % | ASR % | RA % |")
    print("|---|---|---|---|---|")
    for name, extra, m in rows:
        print(f"| {name} | `{extra}` | {100 * m['ca']:.1f} | {100 * m['asr']:.1f} | {100 * m['ra']:.1f} |")


if __name__ == "__main__":
    main()
