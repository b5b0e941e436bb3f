"""SV's wall-time cost on a real run: continue one data-free checkpoint with and without the vaccine.

``datafree_cost.py`` times rounds of a fresh generator and student, where the vaccine flags
nothing. This script times the rounds that matter: it copies a run directory of the ABD table
(e.g. the SV prefix of ``datafree_transfer.py``, stopped at the SR phase start) and continues
each copy for ``--rounds`` rounds under each ``abd.mode`` with the run's own settings (its
``config.yaml``), on the same machine at the same time, in the order ABAB… so that a slow drift
of the machine's speed hits every mode alike. Per call it reports the wall
time of the whole call (set-up included) and, for SV, the time spent in the shuffled teacher's
passes (timed around ``ShufflingVaccine.shuffled_logits``) and the samples flagged.

    python benchmarks/abd_sv_resume_cost.py \\
        --run runs/bench_datafree_transfer/cifar10/trojan_3x3/prefix_zskt_sv_r1470_s0 \\
        --data-root ../shared/data --rounds 20 --threads 2

Results go to ``<out>/abd_sv_resume_cost.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from kdguard.datafree.loop import saved_round
from kdguard.jobs import abd_extensions, fork_datafree_run, run_datafree


class ShuffledPassTimer:
    """Times the shuffled-teacher passes (seconds and calls, with and without gradient) of the
    Shuffling Vaccine of one run: pass it as ``run_datafree(job, extensions=timer)``; it builds the
    job's ABD (:func:`kdguard.jobs.abd_extensions`) and wraps that vaccine's ``shuffled_logits``."""

    def __init__(self) -> None:
        self.seconds = {"no_grad": 0.0, "grad": 0.0}
        self.calls = {"no_grad": 0, "grad": 0}

    def __call__(self, job, setup):
        plugin = abd_extensions(job, setup)
        vaccine = plugin.vaccine if plugin is not None else None
        if vaccine is not None:
            original, timer = vaccine.shuffled_logits, self

            def timed(x, *, grad=False):
                t0 = time.perf_counter()
                out = original(x, grad=grad)
                key = "grad" if grad else "no_grad"
                timer.seconds[key] += time.perf_counter() - t0
                timer.calls[key] += 1
                return out

            vaccine.shuffled_logits = timed  # this run's vaccine object only
        return plugin


def continue_run(args: argparse.Namespace, mode: str, repeat: int, start: int, rounds: int) -> dict:
    """Continue a copy of ``args.run`` (at round ``start``) for ``rounds`` rounds with ``abd.mode=mode``."""
    out = Path(args.out) / f"{mode}_{repeat}"
    # the run's own settings (config.yaml), so the checkpoint fits; only the mode and stop change
    overrides = ["progress=false", f"abd.mode={mode}", f"schedule.stop_after={start + rounds}",
                 "monitor.every=1000000"]
    if args.data_root:  # the test set of the final evaluation
        overrides.append(f"data.root={args.data_root}")
    job = fork_datafree_run(args.run, out, overrides)
    timer = ShuffledPassTimer()
    t0 = time.perf_counter()
    result = run_datafree(job, extensions=timer, threads=args.threads)
    wall = time.perf_counter() - t0
    sv = (result.metrics.get("abd") or {}).get("sv") or {}
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "repeat": repeat, "start_round": start, "rounds": rounds, "wall_seconds": wall,
            "shuffled_pass_seconds": timer.seconds, "shuffled_pass_calls": timer.calls,
            "flagged_share": sv.get("flagged_share"), "flag_samples": sv.get("flag_samples")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True,
                    help="a data-free run directory (datafree_state.pt and config.yaml)")
    ap.add_argument("--data-root", default=None, help="folder holding the test set (e.g. ../shared/data)")
    ap.add_argument("--modes", nargs="+", default=["sv", "off"], help="abd.mode values to compare")
    ap.add_argument("--rounds", type=int, default=20, help="rounds per call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, choices=(0, 1), help="one untimed 1-round call first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/bench_abd_sv_resume_cost")
    args = ap.parse_args()
    if not all((Path(args.run) / f).exists() for f in ("datafree_state.pt", "config.yaml")):
        ap.error(f"--run {args.run}: no datafree_state.pt and config.yaml there; pass a data-free run directory")
    if args.threads:
        torch.set_num_threads(args.threads)  # the runs set it again (threads=args.threads)
    start = saved_round(args.run)
    if args.warmup:  # the first call of a process pays for loading data and warming caches
        continue_run(args, args.modes[0], -1, start, 1)
    calls = [continue_run(args, mode, r, start, args.rounds) for r in range(args.repeats) for mode in args.modes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "abd_sv_resume_cost.json").write_text(json.dumps(
        {"run": args.run, "threads": torch.get_num_threads(), "calls": calls}, indent=2))
    print(f"\n{args.run}: {args.rounds} rounds from round {start} per call, "
          f"{torch.get_num_threads()} threads\n")
    print("| abd.mode | call | wall s | T̃ passes s (no grad / grad) | T̃ calls (no grad / grad) | flagged |")
    print("|---|---|---|---|---|---|")
    for c in calls:
        s, n = c["shuffled_pass_seconds"], c["shuffled_pass_calls"]
        flagged = "—" if c["flagged_share"] is None else f"{100 * c['flagged_share']:.2f} %"
        print(f"| {c['mode']} | {c['repeat'] + 1} | {c['wall_seconds']:.1f} | {s['no_grad']:.2f} / {s['grad']:.2f} | "
              f"{n['no_grad']} / {n['grad']} | {flagged} |")
    base = args.modes[-1]
    median = {m: statistics.median(c["wall_seconds"] for c in calls if c["mode"] == m) for m in args.modes}
    for m in args.modes[:-1]:
        print(f"\n{m} vs {base}: median wall {median[m]:.1f} / {median[base]:.1f} s "
              f"({100 * (median[m] / median[base] - 1):+.1f} %, set-up included)")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
