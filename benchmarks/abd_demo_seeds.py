"""ABD on the demo's setting across seeds: how stable is the demo's ZSKT + ABD row?

The demo teacher (LeNet-5, BadNets grid 10 %, embedded MNIST, ``kdguard.jobs.demo.demo_jobs``) is
trained once (or taken from ``--teacher``). Each variant then distils a LeNet-5 student by ZSKT
for ``--rounds`` pseudo-batches, exactly as ``kdguard demo`` does (``demo_datafree_job``), once
per seed; the seed sets the generator's and the student's initialisation and the latent draws.
Finished runs are cached in ``--out`` and reused. Printed: a Markdown table of last-round CA and
ASR per seed, their means, and the mean wall time per run (docs/abd-results.md §1).

    python benchmarks/abd_demo_seeds.py --out runs/abd_demo_seeds     # ~75 s per run on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from statistics import mean

from kdguard.jobs import run_datafree, train_teacher
from kdguard.jobs.demo import DEMO_ABD, demo_datafree_job, demo_jobs
from seed_table import seed_table, selected

#: name → overrides on top of the demo's ZSKT job (later overrides win)
VARIANTS = {
    "ZSKT, no defence": [],
    "ZSKT + ABD, demo settings (SV + SR)": DEMO_ABD,
    "SR only (demo SR settings)": [*DEMO_ABD, "abd.mode=sr"],
    "SV only (coef 0.1)": [*DEMO_ABD, "abd.mode=sv"],
    "ABD, SV without gradient through T̃": [*DEMO_ABD, "abd.sv.shuffle_grad=false"],
    "ABD, SV coef 0.03": [*DEMO_ABD, "abd.sv.coef=0.03"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/abd_demo_seeds")
    ap.add_argument("--teacher", default=None, help="a finished demo teacher run directory to reuse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--only", nargs="*", default=None, help="variant names (substrings) to run")
    args = ap.parse_args()
    out = Path(args.out)
    if args.teacher and not (out / "teacher" / "metrics.json").exists():
        shutil.copytree(args.teacher, out / "teacher", dirs_exist_ok=True)
    if not (out / "teacher" / "metrics.json").exists():
        train_teacher(demo_jobs(out, progress=False)[0])
    rows, seconds = [], []
    for v, name, extra in selected(VARIANTS, args.only):
        per_seed, walls = [], []
        for seed in args.seeds:
            run_dir = out / f"v{v}_s{seed}"
            if not (run_dir / "metrics.json").exists():
                t0 = time.perf_counter()
                run_datafree(demo_datafree_job(out, abd=False, rounds=args.rounds, progress=False,
                                               extra=[*extra, f"seed={seed}", f"out={run_dir}"]))
                (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
            m = json.loads((run_dir / "metrics.json").read_text())
            per_seed.append(m)
            walls.append(float((run_dir / "wall_seconds.txt").read_text()))
            print(f"{name}, seed {seed}: CA {100 * m['ca']:.1f} ASR {100 * m['asr']:.1f}", flush=True)
        rows.append((name, " ".join(extra) or "(none)", per_seed))
        seconds.append(mean(walls))
    seeds = ", ".join(map(str, args.seeds))
    print(f"\nZSKT {args.rounds} rounds, LeNet-5 → LeNet-5; CA / ASR % of the last round, seeds {seeds}\n")
    print(seed_table(rows, "variant", [("s/run", seconds)]))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
