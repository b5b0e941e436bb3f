"""SV's wall-time cost on a real run: continue one data-free checkpoint with and without the vaccine.

``datafree_cost.py`` times rounds of a fresh generator and student, where the vaccine flags
nothing. This copies a stopped data-free run directory and continues each copy for ``--rounds``
rounds under each ``abd.mode`` with the run's own settings, in the order ABAB... (a slow drift of
the machine hits every mode alike). Per call: wall time (set-up included), the shuffled teacher's
pass time (``kdguard.jobs.datafree_cost.ShuffledPassTimer``) and the flagged share.

    python benchmarks/abd_sv_resume_cost.py --run RUN_DIR --data-root ../shared/data --rounds 20 --threads 2
"""
import argparse, json, shutil, statistics, time  # noqa: E401
from pathlib import Path

from kdguard.datafree.loop import saved_round
from kdguard.jobs import fork_datafree_run, run_datafree
from kdguard.jobs.datafree_cost import ShuffledPassTimer

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", required=True, help="a data-free run directory (datafree_state.pt and config.yaml)")
ap.add_argument("--data-root", help="folder holding the test set (e.g. ../shared/data)")
ap.add_argument("--modes", nargs="+", default=["sv", "off"], help="abd.mode values to compare")
ap.add_argument("--rounds", type=int, default=20)
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--threads", type=int)
ap.add_argument("--out", default="runs/bench_abd_sv_resume_cost")
a = ap.parse_args()
if not all((Path(a.run) / f).exists() for f in ("datafree_state.pt", "config.yaml")):
    ap.error(f"--run {a.run}: no datafree_state.pt and config.yaml there; pass a data-free run directory")
start = saved_round(a.run)


def call(mode: str, repeat: int, rounds: int) -> dict:
    out = Path(a.out) / f"{mode}_{repeat}"
    overrides = ["progress=false", f"abd.mode={mode}", f"schedule.stop_after={start + rounds}", "monitor.every=1000000"]
    job = fork_datafree_run(a.run, out, overrides + ([f"data.root={a.data_root}"] if a.data_root else []))
    timer, t0 = ShuffledPassTimer(), time.perf_counter()
    sv = (run_datafree(job, extensions=timer, threads=a.threads).metrics.get("abd") or {}).get("sv") or {}
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "repeat": repeat, "rounds": rounds, "wall_seconds": wall, "pass_seconds": timer.seconds,
            "pass_calls": timer.calls, "flagged_share": sv.get("flagged_share")}


call(a.modes[0], -1, 1)  # untimed: the first call of a process pays for loading data and warming caches
calls = [call(m, r, a.rounds) for r in range(a.repeats) for m in a.modes]
Path(a.out).mkdir(parents=True, exist_ok=True)
(Path(a.out) / "abd_sv_resume_cost.json").write_text(json.dumps({"run": a.run, "start_round": start, "calls": calls}, indent=2))
print(f"\n{a.run}: {a.rounds} rounds from round {start} per call\n\n"
      "| abd.mode | call | wall s | T̃ passes s (no grad / grad) | T̃ calls (no grad / grad) | flagged |\n|---|---|---|---|---|---|")
for c in calls:
    s, n = c["pass_seconds"], c["pass_calls"]
    flagged = "—" if c["flagged_share"] is None else f"{100 * c['flagged_share']:.2f} %"
    print(f"| {c['mode']} | {c['repeat'] + 1} | {c['wall_seconds']:.1f} | {s['no_grad']:.2f} / {s['grad']:.2f} | "
          f"{n['no_grad']} / {n['grad']} | {flagged} |")
median = {m: statistics.median(c["wall_seconds"] for c in calls if c["mode"] == m) for m in a.modes}
for m in a.modes[:-1]:
    print(f"\n{m} vs {a.modes[-1]}: median wall {median[m]:.1f} / {median[a.modes[-1]]:.1f} s "
          f"({100 * (median[m] / median[a.modes[-1]] - 1):+.1f} %, set-up included)")
