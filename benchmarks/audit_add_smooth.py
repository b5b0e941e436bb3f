"""Add the smooth additive search to finished audits and re-decide their verdicts (docs/audit.md).

For each ``TEACHER_DIR=AUDIT_JSON`` pair, rebuilds the audit's clean set exactly as ``kdguard
audit`` took it (the record's dataset, clean fraction, seed and image cap), runs only the smooth
search (``kdguard.audit.AdditiveSearch(grid=16)``, seeded ``seed + k`` for class k as the audit
does, so its numbers are the ones a full audit with the same settings records), and recomputes
the indices and the verdict with the record's mask, dense additive and shuffle results. Writes
each updated record to ``--out/NAME.json`` and prints ``kdguard audit-summary``'s table over them.

    python benchmarks/audit_add_smooth.py --out results/audit-smooth/cifar10 --threads 2 \\
        results/audit-measured/teachers/cifar10/sig=results/audit-measured/audits/cifar10/sig/audit.json ...
"""
import argparse, json, time  # noqa: E401
from pathlib import Path

from kdguard.audit.anomaly import anomaly_index
from kdguard.audit.core import SMOOTH_GRID, cap_images
from kdguard.audit.reachability import AdditiveSearch, additive_trigger, check_clean_set
from kdguard.audit.report import summary_table
from kdguard.audit.verdict import decide
from kdguard.config import DataConfig, TeacherSpec
from kdguard.data import clean_subset, load_splits
from kdguard.io import write_json
from kdguard.runs import RunContext
from kdguard.runtime import configure_threads, machine_label

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("pairs", nargs="+", help="TEACHER_DIR=AUDIT_JSON")
ap.add_argument("--data-root", default="../shared/data")
ap.add_argument("--grid", type=int, default=SMOOTH_GRID)
ap.add_argument("--out", required=True)
ap.add_argument("--threads", type=int)
a = ap.parse_args()
threads = configure_threads(a.threads)
out_dir = Path(a.out)
out_dir.mkdir(parents=True, exist_ok=True)
records = []
for pair in a.pairs:
    teacher_dir, audit_path = pair.split("=", 1)
    rec = json.loads(Path(audit_path).read_text())
    s = rec["settings"]
    model, _ = RunContext.load_teacher(Path(teacher_dir), TeacherSpec())
    model.eval()
    data = load_splits(DataConfig(name=rec["dataset"], root=a.data_root, augment=False), seed=rec["seed"])
    clean = clean_subset(data, rec["clean_fraction"], rec["seed"])
    x, y = cap_images(check_clean_set(clean.images, clean.labels), clean.labels, s["max_images"], s["seed"])
    add = s["additive"]
    search = AdditiveSearch(eps_max=add["eps_max"], batch_size=add["batch_size"], grid=a.grid)
    t0 = time.perf_counter()
    found = [additive_trigger(model, x, y, k, search=search, seed=s["seed"] + k) for k in range(len(rec["classes"]))]
    seconds = time.perf_counter() - t0
    smooth = anomaly_index([f.eps for f in found], min_spread=search.resolution)
    # recorded indices may be "inf"/"-inf" (JSON has no infinity): float() reads both
    indices = {name: [float(c["index"][name]) for c in rec["classes"]] for name in ("mask", "additive", "shuffle")}
    indices["smooth"] = smooth
    collapse = s["shuffle"]["collapse"]
    verdict = decide(indices, threshold=s["threshold"], votes=s["votes"],
                     signals={"shuffle": [v > collapse for v in indices["shuffle"]]})
    for c, f, i in zip(rec["classes"], found, smooth):
        c.update(smooth_eps=f.eps, smooth_success=f.success, smooth_reached=f.reached)
        c["index"]["smooth"] = i
    before = {"verdict": rec["verdict"], "suspected_targets": rec["suspected_targets"]}
    rec.update(verdict=verdict.verdict, suspected_targets=verdict.targets,
               signals={str(k): v for k, v in verdict.signals.items()}, without_smooth=before)
    rec["settings"]["smooth"] = {**add, "grid": a.grid}
    rec["seconds"]["smooth"] = seconds
    rec["seconds"]["total"] += seconds
    rec["smooth_run"] = {"threads": threads, "machine": machine_label(), "seconds": seconds}
    name = Path(teacher_dir).name
    write_json(out_dir / f"{name}.json", rec)
    records.append(rec)
    target = (rec["teacher"].get("recorded_attack") or {}).get("target")
    print(f"{name}: target {target}; smooth eps {[round(f.eps, 3) for f in found]}; index "
          f"{[round(i, 1) for i in smooth]}; {before['verdict']} {before['suspected_targets']} -> "
          f"{verdict.verdict} {verdict.targets} ({seconds:.0f} s)", flush=True)
print()
print(summary_table(records))
