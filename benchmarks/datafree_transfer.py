"""Does data-free KD transfer a teacher's backdoor? The CPU-scale CIFAR-10 protocol of docs/datafree.md.

ABD (Hong et al., ICML 2023) reports that ZSKT transfers the BadNets-grid backdoor of a CIFAR-10
teacher at > 90 % ASR while KD on clean data stays < 10 %. This script measures the same at CPU
scale:

* teachers: ResNet-20, trained once per attack (BadNets 3×3 grid, Trojan 3×3, Blend; 10 %
  dirty-label, target 0; SGD 0.1, cosine, ``--teacher-epochs`` epochs) and cached;
* students: ResNet-8, by ZSKT, CMI and OOD (single-image patches) for BadNets, and by ZSKT for
  Trojan 3×3 and Blend, each next to clean-data KD (20 % of the training split, τ = 6,
  α = 0.95, as ABD's ``kd_distill.py``);
* data-free budgets: the ``cpu`` preset of each method (see ``kdguard/configs/datafree/``);
  a ZSKT run takes 36–82 minutes on 2 CPU cores (two AMD EPYC machines, docs/abd-cifar10.md).

Every stage is its own run directory; a finished stage (``metrics.json`` present) is skipped
and an unfinished one resumes from its state file, so the table can be built in parts
(``--only badnets:zskt badnets:clean_kd`` runs those cells; every cell an earlier call finished
is reported too, and the ones not run yet are listed). Cells write only their own run directories,
so once a teacher exists (``--only badnets:teacher`` trains just that) its cells can run as
separate processes at once: ``benchmarks/datafree_parallel.sh`` does that on a GPU. Results: ``<out>/summary_<table>.json`` and a
Markdown table. ``--table abd`` builds the ABD issue's table instead (five triggers; ZSKT,
ZSKT + ABD, clean KD; CMI ± ABD; the SV-only / SR-only ablation), sharing teachers and cells;
its report ends with the table at a glance (``headline_table``: CA / ASR per trigger and method,
their means and train minutes) and the issue's targets judged on the cells finished so far
(``target_check``).
Finished cells and their teachers are also recorded in the committed ledger (``LEDGER``), so the
report and later cells carry over to a new machine whose ``runs/`` is empty (``--ledger``).

    python benchmarks/datafree_transfer.py --data-root ../shared/data              # transfer table
    python benchmarks/datafree_transfer.py --data-root ../shared/data --table abd  # ABD table
    python benchmarks/datafree_transfer.py --data-root ../shared/data --report     # finished cells only
    python benchmarks/datafree_transfer.py --smoke [--table abd]                   # tiny, embedded MNIST
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from filelock import FileLock

from kdguard.abd import SelfRetrospection
from kdguard.config import (
    AttackConfig,
    DataConfig,
    DistillJob,
    KDConfig,
    OptimConfig,
    TeacherJob,
    TrainConfig,
)
from kdguard.checkpoint import environment_info
from kdguard.jobs import build_datafree_job, distill, run_datafree, train_teacher
from kdguard.datafree.loop import saved_round
from kdguard.errors import KDGuardError
from kdguard.io import atomic_write, write_json, write_text
from kdguard.report import metrics_table
from kdguard.rundir import adopt_copy
from kdguard.runtime import cpu_name

#: torch's intra-op threads of every run (``--threads``; None: the library's default)
THREADS: int | None = None

#: table → attack → student methods. "transfer": the data-free issue's table; "abd": the ABD
#: issue's headline table (undefended ZSKT, ZSKT + ABD and clean KD for five triggers, CMI ± ABD
#: for two, and the SV-only / SR-only ablation). "+abd" = abd.mode=full, "+sv", "+sr" = one part.
#: Trojan watermark also has SV only: it continues the SV prefix that ZSKT + ABD runs anyway, so it
#: costs only the last 2 % of the rounds and says whether SR's CA cost on top of SV (Trojan 3×3)
#: recurs on a second trigger.
#: Blend runs twice: with kdguard's default uniform-noise pattern (its teacher answers the target on
#: any noise-like image and ZSKT collapses, docs/datafree-results.md §1) and with a seeded flat-colour
#: cartoon (``blend_cartoon``), the stand-in for the paper's cartoon ``blend.png``.
#: ``_k<N>`` cells shuffle N layers instead of ABD's 5 (``abd.sv.layers``): on these ResNet-20
#: teachers SV's premise holds with 1–2 shuffled layers and fails with 5
#: (``benchmarks/sv_premise.py``, docs/abd-results.md §3).
PROTOCOLS = {
    "transfer": {
        "badnets": ["zskt", "cmi", "ood", "clean_kd"],
        "trojan_3x3": ["zskt", "clean_kd"],
        "blend": ["zskt", "clean_kd"],
    },
    "abd": {
        "badnets": ["zskt", "zskt+abd", "zskt+sv", "zskt+sr", "cmi", "cmi+abd", "clean_kd"],
        "trojan_3x3": ["zskt", "zskt+abd", "zskt+sv", "zskt+sr", "cmi", "cmi+abd", "clean_kd"],
        "trojan_wm": ["zskt", "zskt+abd", "zskt+sv", "clean_kd"],
        "blend": ["zskt", "zskt+abd", "clean_kd"],
        "blend_cartoon": ["zskt", "zskt+abd", "zskt+sv_k2", "zskt+abd_k2", "clean_kd"],
        "sig_abd": ["zskt", "zskt+abd", "clean_kd"],
    },
}
ATTACK_LABEL = {"badnets": "BadNets grid 3×3", "trojan_3x3": "Trojan 3×3", "blend": "Blend",
                "blend_cartoon": "Blend (cartoon pattern)",
                "trojan_wm": "Trojan watermark", "sig_abd": "SIG (clean-label)"}
#: poison rate per attack (None: the preset's own, i.e. every target-class image for SIG)
POISON_RATE = {"sig_abd": None}
ABD_MODES = {"abd": "full", "sv": "sv", "sr": "sr"}


def parse_defence(defence: str) -> tuple[str, int | None]:
    """``"sv"`` → ``("sv", None)``; ``"abd_k2"`` → ``("abd", 2)``: the ABD part and, after
    ``_k``, the number of shuffled layers (``abd.sv.layers``; None = the default 5).

    Raises:
        KDGuardError: an unknown part or a malformed ``_k`` suffix.
    """
    name, sep, k = defence.partition("_k")
    if name not in ABD_MODES or (sep and not (k.isdigit() and int(k) > 0)) or (sep and name == "sr"):
        raise KDGuardError(f"unknown defended cell suffix {defence!r}",
                           f"use one of {sorted(ABD_MODES)}, or sv/abd with _k<layers> (e.g. sv_k2)")
    return name, int(k) if sep else None


def sr_prefix(method: str) -> str | None:
    """The cell ``method`` equals before the SR phase (see ``shared_prefix``), or None:
    ``zskt+sr`` → ``zskt``, ``zskt+abd`` → ``zskt+sv``, ``cmi+abd_k2`` → ``cmi+sv_k2``."""
    base, _, defence = method.partition("+")
    if not defence:
        return None
    name, k = parse_defence(defence)
    if name == "sr":
        return base
    if name == "abd":
        return f"{base}+sv" + ("" if k is None else f"_k{k}")
    return None
#: ABD README (WRN-16-2 → WRN-16-1, CIFAR-10): (CA, ASR) in % per attack and method
ABD_REFERENCE = {
    "badnets": {"zskt": (71.9, 96.9), "zskt+abd": (68.3, 0.7), "clean_kd": (74.6, 4.3)},
    "trojan_3x3": {"zskt": (80.9, 96.8), "zskt+abd": (71.7, 33.3), "clean_kd": (72.9, 1.7)},
    "trojan_wm": {"zskt": (82.7, 93.9), "zskt+abd": (78.2, 22.5), "clean_kd": (77.5, 11.1)},
    "blend": {"zskt": (77.0, 74.4), "zskt+abd": (71.5, 23.1), "clean_kd": (78.0, 4.3)},
    # the paper's blend.png is a cartoon: the cartoon-pattern row is the one to compare with
    "blend_cartoon": {"zskt": (77.0, 74.4), "zskt+abd": (71.5, 23.1), "clean_kd": (78.0, 4.3)},
    "sig_abd": {"zskt": (77.9, 0.0), "zskt+abd": (72.2, 0.0), "clean_kd": (77.4, 0.0)},
}


#: the ABD issue's targets: where the undefended method transfers > 50 % ASR, its "+abd" cell
#: brings the mean ASR below 10 % at a mean CA drop of at most 3 points; SV alone costs at most
#: 10 % more training time than the undefended run
TARGETS = {"transfer_bar": 0.50, "max_mean_asr": 0.10, "max_ca_drop": 0.03, "max_sv_overhead": 0.10}
#: target kind → (value format, bar format), both fed percentages
TARGET_FORMAT = {"mean_asr": ("{:.1f} %", "< {:.0f} %"), "ca_drop": ("{:.1f} points", "≤ {:.0f} points"),
                 "sv_overhead": ("{:+.1f} %", "≤ +{:.0f} %")}


#: the defended cells judged by the ASR and CA targets, the issue's "+abd" first; variants with
#: another number of shuffled layers (``+sv_k2``) follow, when any ran
DEFENDED_VARIANTS = ("abd", "sv", "sr")


def defended_variants(base: str, methods) -> list[str]:
    """The defended cells of ``base`` to judge: ``+abd`` always, then those of ``methods`` that
    ran (``DEFENDED_VARIANTS`` order, then the ``_k`` variants sorted)."""
    ran = {m.partition("+")[2] for m in methods if m.startswith(f"{base}+")}
    order = [v for v in DEFENDED_VARIANTS if v == "abd" or v in ran]
    return [f"{base}+{v}" for v in order + sorted(ran - set(DEFENDED_VARIANTS))]


def _defended_rows(by: dict, weights: dict, base: str, defended_method: str, targets: dict) -> list[dict]:
    """The mean-ASR and CA-drop rows of ``target_check`` for one defended cell against ``base``."""
    finished_pairs, pending, collapsed, asrs, drops = [], [], [], [], []
    kept_asrs, kept_drops = [], []  # the same, without the collapsed pairs
    for (attack, seed, method), s in sorted(by.items()):
        if method != base or s.get("asr") is None or s["asr"] <= targets["transfer_bar"]:
            continue
        pair = f"{attack}:s{seed}"
        is_collapse = (s.get("asr_no_trigger") or 0.0) > targets["transfer_bar"]
        if is_collapse:
            collapsed.append(pair)
        defended = by.get((attack, seed, defended_method))
        if defended is None or defended.get("asr") is None:
            pending.append(pair)
            continue
        if weights[(attack, seed, defended_method)] != weights[(attack, seed, method)]:
            pending.append(f"{pair} (other teacher)")
            continue
        finished_pairs.append(pair)
        asrs.append(defended["asr"])
        drops.append(s["ca"] - defended["ca"])
        if not is_collapse:
            kept_asrs.append(asrs[-1])
            kept_drops.append(drops[-1])

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    mean_asr, mean_drop = mean(asrs), mean(drops)
    common = {"method": defended_method, "pairs": finished_pairs, "pending": pending, "collapsed": collapsed}
    return [{"kind": "mean_asr", "target": f"mean ASR where {base} transfers > {100 * targets['transfer_bar']:.0f} %",
             "value": mean_asr, "value_without_collapsed": mean(kept_asrs), "bar": targets["max_mean_asr"],
             "met": None if mean_asr is None else mean_asr < targets["max_mean_asr"], **common},
            {"kind": "ca_drop", "target": f"mean CA drop against {base} on the same pairs",
             "value": mean_drop, "value_without_collapsed": mean(kept_drops), "bar": targets["max_ca_drop"],
             "met": None if mean_drop is None else mean_drop <= targets["max_ca_drop"], **common}]


def teacher_digest(cell: dict) -> str | None:
    """The sha256 of the teacher weights a cell was distilled from (None: not recorded, e.g. a
    ``ledger*`` cell transcribed after its teacher was lost)."""
    return (cell.get("teacher") or {}).get("sha256")


def target_check(cells: list[dict], targets: dict = TARGETS) -> list[dict]:
    """The ABD issue's targets, judged on the finished cells of ``summary["cells"]``.

    For each undefended data-free method (``zskt``, ``cmi``) and each defended cell of it (always
    ``+abd``, the issue's; ``+sv`` and ``+sr``, the ablation's, when any ran) one row for the
    defended cell's mean ASR, one for its mean CA drop, both over the (attack, seed) pairs where
    the undefended cell's last-round ASR exceeds ``transfer_bar`` and the defended cell is
    finished; one row for the ``+sv`` cell's training-time overhead over the pairs where both
    ran. A row is
    ``{"kind", "target", "method", "pairs", "value", "bar", "met", "pending", "collapsed"}`` (values
    and bars as fractions): ``met`` is
    None when no pair is finished; ``pending`` names the transferring pairs whose defended cell
    has not run, or was distilled from another teacher (the cells' ``teacher["sha256"]`` differ,
    e.g. a teacher trained again after its first one was lost: ``attack:s0 (other teacher)``);
    ``collapsed`` the transferring pairs whose undefended student also answers the
    target class without the trigger (ASR without trigger above the bar: a collapse rather than
    a trigger-specific backdoor; counted, by the letter of the target, but flagged). The ASR and
    CA-drop rows also carry ``value_without_collapsed``, their mean over the finished pairs that
    did not collapse (None when none is left): a collapsed student sits at chance CA, so a
    defended cell that escapes the collapse gains CA and would flatter the mean drop.
    """
    by = {(c["attack"], c["seed"], c["method"]): c["student"] for c in cells}
    weights = {(c["attack"], c["seed"], c["method"]): teacher_digest(c) for c in cells}
    undefended = sorted({m for (_, _, m) in by if "+" not in m and m != "clean_kd"})
    rows = []
    for base in undefended:
        # the target is on "+abd"; the ablation's SV-only and SR-only cells, where run,
        # are judged by the same bars (abd.mode=sv / sr are ABD's own options)
        for defended_method in defended_variants(base, {m for (_, _, m) in by}):
            rows.extend(_defended_rows(by, weights, base, defended_method, targets))
        overheads, pairs = [], []
        for (attack, seed, method), s in sorted(by.items()):
            sv = by.get((attack, seed, f"{base}+sv"))
            if method == base and sv is not None and s.get("train_seconds") \
                    and weights[(attack, seed, f"{base}+sv")] == weights[(attack, seed, method)]:
                overheads.append(sv["train_seconds"] / s["train_seconds"] - 1.0)
                pairs.append(f"{attack}:s{seed}")
        if overheads:
            mean = sum(overheads) / len(overheads)
            rows.append({"kind": "sv_overhead",
                         "target": f"training-time overhead of SV over {base} (logged minutes of runs made "
                                   "at different times; abd_sv_resume_cost.py compares at one time)",
                         "method": f"{base}+sv",
                         "pairs": pairs, "value": mean, "bar": targets["max_sv_overhead"],
                         "met": mean <= targets["max_sv_overhead"], "pending": [], "collapsed": [],
                         "value_without_collapsed": mean})
    return rows


def print_targets(rows: list[dict]) -> None:
    """The rows of ``target_check`` as a Markdown table."""
    if not rows:
        return
    print("\n| target | cell | pairs | value | bar | met | pending (no defended cell yet) | collapsed "
          "| value without collapsed pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt, bar = TARGET_FORMAT[r["kind"]]
        value = "—" if r["value"] is None else fmt.format(100 * r["value"])
        kept = r.get("value_without_collapsed")
        kept = "—" if kept is None else fmt.format(100 * kept)
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['target']} | {r['method']} | {', '.join(r['pairs']) or '—'} | {value} | "
              f"{bar.format(100 * r['bar'])} | {met} | {', '.join(r['pending']) or '—'} | "
              f"{', '.join(r['collapsed']) or '—'} | {kept} |")


def settings(args: argparse.Namespace) -> dict:
    """Scale-dependent sizes: the CIFAR-10 protocol, or a seconds-long smoke test."""
    if args.smoke:
        return {"dataset": "mnist_embedded", "root": None, "teacher": "resnet8", "student": "resnet8",
                "teacher_epochs": 1, "kd_epochs": 1, "batch": 64,
                "datafree": ["schedule.rounds=2", "schedule.student_steps=2", "schedule.batch_size=32",
                             "schedule.generator_steps=2", "generator.width=8", "ood.patches=128",
                             "cmi.bank_size=256", "cmi.negatives=32", "monitor.every=1",
                             "monitor.grid_every=2"],
                "cmi_overrides": ["schedule.synthesis_batch_size=32"]}
    return {"dataset": "cifar10", "root": args.data_root, "teacher": "resnet20", "student": "resnet8",
            "teacher_epochs": args.teacher_epochs, "kd_epochs": args.kd_epochs, "batch": 128,
            "datafree": [], "cmi_overrides": []}


def teacher_job(attack: str, cfg: dict, out: Path, seed: int) -> TeacherJob:
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return TeacherJob(data=DataConfig(name=cfg["dataset"], root=cfg["root"], val_fraction=0.05),
                      attack=AttackConfig(name=attack, target=0, poison_rate=POISON_RATE.get(attack, 0.1)),
                      model=cfg["teacher"],
                      train=TrainConfig(epochs=cfg["teacher_epochs"], batch_size=cfg["batch"], optim=sgd,
                                        progress=False),
                      seed=seed, out=str(out / "teachers" / f"{attack}_s{seed}"))


def clean_kd_job(teacher: str, cfg: dict, out: Path, seed: int) -> DistillJob:
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)  # ABD kd_distill.py
    return DistillJob(teacher=teacher, data=DataConfig(name=cfg["dataset"], root=cfg["root"], val_fraction=0.05),
                      student=cfg["student"], clean_fraction=0.2,
                      kd=KDConfig(method="kd", temperature=6.0, alpha=0.95),
                      train=TrainConfig(epochs=cfg["kd_epochs"], batch_size=cfg["batch"], optim=sgd,
                                        progress=False),
                      seed=seed, out=out)


def finished(out: Path) -> dict | None:
    """``metrics.json`` of a finished stage, or None."""
    done = Path(out) / "metrics.json"
    return json.loads(done.read_text()) if done.exists() else None


def cached(out: Path, run) -> dict:
    """``metrics.json`` of a finished stage, else run it (resuming) and return its metrics."""
    done = finished(out)
    return done if done is not None else run().metrics


def run_log(out: Path) -> list[dict]:
    """The records of a stage's ``metrics.jsonl`` (one per epoch or logged round), [] if none."""
    log = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line] if log.exists() else []


def peak_asr(log: list[dict]) -> list | None:
    """[ASR, round] of the highest test ASR a data-free run logged, or None (clean KD logs none).

    A diagnostic of how much backdoor the student held at some point: the table's ASR is always
    the last round's, never this one.
    """
    trace = [(r["eval"]["asr"], r["round"]) for r in log
             if "round" in r and (r.get("eval") or {}).get("asr") is not None]
    return list(max(trace)) if trace else None


def train_seconds(log: list[dict], metrics: dict) -> float:
    """Training time over every call of a (resumed) stage, evaluations excluded.

    ``metrics["seconds"]`` covers the last call only. Pipeline runs older than ``train_seconds``
    in the metrics are summed from their log (one record per epoch).
    """
    if metrics.get("train_seconds") is not None:
        return float(metrics["train_seconds"])
    if not log:
        return float(metrics.get("seconds") or 0.0)
    return sum(float(r.get("seconds") or 0.0) for r in log)


def datafree_overrides(method: str, teacher: str, cfg: dict, out: Path, seed: int, progress: bool) -> list[str]:
    """Job overrides of a data-free cell (``zskt``, ``zskt+abd``, ``cmi+sr`` …)."""
    method, _, defence = method.partition("+")
    overrides = [f"teacher={teacher}", f"method={method}", "preset=cpu", f"student={cfg['student']}",
                 f"seed={seed}", f"out={out}", f"progress={str(progress).lower()}", *cfg["datafree"]]
    if defence:
        name, layers = parse_defence(defence)
        overrides.append(f"abd.mode={ABD_MODES[name]}")
        if layers is not None:
            overrides.append(f"abd.sv.layers={layers}")
    if cfg["root"]:
        overrides.append(f"data.root={cfg['root']}")
    if method in ("cmi", "ood"):
        overrides += cfg["cmi_overrides"]
    return overrides


def cell_dir(out: Path, attack: str, method: str, seed: int) -> Path:
    return out / attack / f"{method.replace('+', '_')}_s{seed}"


#: committed record of the table (``--ledger``): every finished cell's numbers and the teachers
#: they were distilled from. Run directories under ``runs/`` stay on the machine that made them;
#: this folder is in git, so a table built in parts survives the machines its parts ran on.
LEDGER = Path(__file__).resolve().parent / "results" / "datafree_transfer"
#: files of a finished teacher run that the ledger keeps (weights ≈ 1 MB for a ResNet-20); the
#: training state and the poison indices stay behind
TEACHER_FILES = ("model.safetensors", "manifest.json", "config.yaml", "metrics.jsonl", "metrics.json")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def teacher_sha256(run_dir: Path) -> str | None:
    weights = Path(run_dir) / "model.safetensors"
    return file_sha256(weights) if weights.exists() else None


def record_teacher(ledger: Path, run_dir: Path) -> None:
    """Copy a finished teacher run's files into ``ledger/teachers/<name>`` unless it holds one.

    ``sha256.txt`` holds the weights' digest, checked when another machine restores them.
    """
    dest = ledger / "teachers" / Path(run_dir).name
    if (dest / "metrics.json").exists():
        return
    for name in TEACHER_FILES:  # metrics.json last: its presence marks a complete copy
        if (Path(run_dir) / name).exists():
            copy_atomic(Path(run_dir) / name, dest / name)
        if name == "model.safetensors":
            write_text(dest / "sha256.txt", file_sha256(dest / name) + "\n")


def restore_teacher(ledger: Path, run_dir: Path) -> bool:
    """Seed an unfinished teacher run directory with the ledger's teacher of the same name.

    The ledger's teacher wins over a local run that has not finished: every recorded cell was
    distilled from it. Returns whether a teacher was restored.

    Raises:
        KDGuardError: the ledger's weights are missing or do not match their recorded digest
            (a Git LFS pointer, a truncated checkout, an edited file, no ``sha256.txt``).
    """
    src = ledger / "teachers" / Path(run_dir).name
    if finished(run_dir) is not None or not (src / "metrics.json").exists():
        return False
    digest = src / "sha256.txt"
    expected = digest.read_text().strip() if digest.exists() else None
    if not (src / "model.safetensors").exists() or file_sha256(src / "model.safetensors") != expected:
        raise KDGuardError(f"teacher weights {src / 'model.safetensors'} do not match {src / 'sha256.txt'}",
                           "restore the file from git (git checkout -- <path>), or delete the folder "
                           "to train the teacher again (its recorded cells then no longer apply)")
    for name in TEACHER_FILES:  # metrics.json last, as in record_teacher
        if (src / name).exists():
            copy_atomic(src / name, Path(run_dir) / name)
    return True


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy a file so that readers (parallel cells) see the old file or the whole new one."""
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def record_path(ledger: Path, attack: str, method: str, seed: int) -> Path:
    return ledger / attack / f"{method.replace('+', '_')}_s{seed}.json"


def record_cell(ledger: Path, cell: dict, threads: int) -> None:
    """Write a finished cell's record (its summary entry and who made it) into the ledger.

    An existing record with the same numbers is left as it is, so reports do not churn files.
    """
    path = record_path(ledger, cell["attack"], cell["method"], cell["seed"])
    cell = json.loads(json.dumps(cell))  # as it reads back: tuples become lists
    if path.exists() and {k: v for k, v in json.loads(path.read_text()).items() if k != "recorded"} == cell:
        return
    env = environment_info()
    write_json(path, {**cell, "recorded": {"machine": cpu_name(), "threads": threads,
                                           **{k: env[k] for k in ("torch", "git_commit", "created")}}})


def add_from_ledger(summary: dict, ledger: Path | None, attack: str, method: str, seed: int) -> None:
    """Add a cell this machine has not run to ``summary["cells"]`` from its ledger record
    (``source`` set to ``"ledger"``), or to ``summary["missing"]`` when there is none."""
    path = None if ledger is None else record_path(ledger, attack, method, seed)
    if path is None or not path.exists():
        summary["missing"].append(f"{attack}:{method}")
        return
    summary["cells"].append({**json.loads(path.read_text()), "source": "ledger"})


def shared_prefix(method: str, methods: list[str]) -> str | None:
    """The cell whose rounds before the SR phase ``method`` shares, within one attack's cells.

    Self-Retrospection changes nothing before its phase (tested in
    ``tests/datafree/test_datafree_abd.py``), so ``zskt+sr`` is ``zskt`` until the phase starts
    and ``zskt+abd`` is ``zskt+sv``. Those rounds then run once, in a prefix run, and every cell
    that shares them continues a copy of it: the SV/SR ablation costs two full runs and two SR
    phases instead of four full runs. Each cell's train minutes still include the prefix, i.e.
    what the cell costs on its own.
    """
    if any(sr_prefix(m) == method for m in methods):
        return method
    base = sr_prefix(method)
    return base if base in methods else None


def start_from_prefix(job, base: str, teacher: str, cfg: dict, out: Path, attack: str, seed: int,
                      progress: bool) -> None:
    """Seed the cell's run directory with a copy of the shared prefix run (run first if needed).

    A cell that is finished or has a checkpoint of its own is left alone (it resumes as it is),
    except that a run of the base cell that has not passed the phase start becomes the prefix run
    when there is none yet, so none of its rounds are lost. ``job`` is the cell's own job; ``base``
    the cell whose rounds it shares (``shared_prefix``).
    """
    s_out = Path(job.out)
    if finished(s_out) is not None:
        return
    # every job carries the SR settings (used or not), so the cell's own job gives the phase start
    start = SelfRetrospection(job.abd.sr).phase_start(job.schedule.rounds)
    prefix = out / attack / f"prefix_{base.replace('+', '_')}_r{start}_s{seed}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # cells run as parallel processes (datafree_parallel.sh) share the prefix: one runs it, the
    # others wait for it here
    with FileLock(f"{prefix}.lock"):
        base_dir = cell_dir(out, attack, base, seed)
        if not prefix.exists() and finished(base_dir) is None:
            base_round = saved_round(base_dir)
            if base_round is not None and base_round <= start:
                base_dir.rename(prefix)
        if saved_round(s_out) is not None:
            return
        if (saved_round(prefix) or 0) < start:
            run_datafree(build_datafree_job(None, datafree_overrides(base, teacher, cfg, prefix, seed, progress)
                                            + [f"schedule.stop_after={start}"]), threads=THREADS)
        shutil.copytree(prefix, s_out, dirs_exist_ok=True)
        adopt_copy(s_out, job, source=prefix, parents=("teacher",))  # the copy continues as this cell


def student_stage(method: str, teacher: str, cfg: dict, out: Path, attack: str, methods: list[str],
                  seed: int, progress: bool) -> dict:
    s_out = cell_dir(out, attack, method, seed)
    if method == "clean_kd":
        job = clean_kd_job(teacher, cfg, str(s_out), seed)
        return cached(s_out, lambda: distill(job, threads=THREADS))
    job = build_datafree_job(None, datafree_overrides(method, teacher, cfg, s_out, seed, progress))
    base = shared_prefix(method, methods)
    if base is not None:
        start_from_prefix(job, base, teacher, cfg, out, attack, seed, progress)
    return cached(s_out, lambda: run_datafree(job, threads=THREADS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None, help="folder holding CIFAR-10 (e.g. ../shared/data)")
    ap.add_argument("--out", default="runs/bench_datafree_transfer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--table", choices=sorted(PROTOCOLS), default="transfer",
                    help="transfer: the data-free table; abd: the ABD headline table and ablation")
    ap.add_argument("--only", nargs="*", default=None, metavar="ATTACK:METHOD",
                    help="run only these cells, e.g. badnets:zskt badnets:zskt+abd; ATTACK:teacher trains "
                         "only that teacher")
    ap.add_argument("--report", action="store_true", help="run nothing: print the cells finished so far")
    ap.add_argument("--ledger", default=None,
                    help="committed record of finished cells and their teachers (default "
                         "benchmarks/results/datafree_transfer for the CIFAR-10 protocol, none for --smoke; "
                         "'none' turns it off)")
    ap.add_argument("--list", action="store_true", help="print the table's cells (ATTACK:METHOD), one a line")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--kd-epochs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None,
                    help="pin torch's intra-op threads (default: every core, as the library does)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on embedded MNIST (checks the script)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args()
    if not (args.smoke or args.data_root or args.list):
        ap.error("--data-root is required for the CIFAR-10 protocol (or use --smoke)")
    if args.threads:
        global THREADS
        THREADS = args.threads  # every run of this process sets it (the jobs' threads=)
        torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.table]
    if args.list:
        print("\n".join(f"{attack}:{m}" for attack, methods in protocol.items() for m in methods))
        return
    known = {(a, m) for a, methods in protocol.items() for m in (*methods, "teacher")}
    wanted = None
    if args.report:
        wanted = set()
    elif args.only:
        wanted = {tuple(x.split(":", 1)) for x in args.only}
        unknown = sorted(":".join(c) for c in wanted - known)
        if unknown:
            ap.error(f"--only: {' '.join(unknown)} not in the {args.table!r} table; "
                     f"--table {args.table} --list prints its cells")
    cfg = settings(args)
    out = Path(args.out) / ("smoke" if args.smoke else "cifar10")
    ledger = None if (args.ledger or "").lower() == "none" or (args.smoke and args.ledger is None) \
        else Path(args.ledger or LEDGER) / out.name
    summary: dict = {"settings": {k: v for k, v in cfg.items()}, "cells": [], "missing": []}
    for attack, methods in protocol.items():
        for seed in args.seeds:
            t_job = teacher_job(attack, cfg, out, seed)
            todo = [m for m in methods if wanted is None or (attack, m) in wanted]
            teacher_wanted = bool(todo) or (wanted is not None and (attack, "teacher") in wanted)
            if ledger is not None:
                restore_teacher(ledger, Path(t_job.out))
            if not teacher_wanted and finished(Path(t_job.out)) is None:
                for method in methods:  # the teacher is not here: its recorded cells still count
                    add_from_ledger(summary, ledger, attack, method, seed)
                continue
            t0 = time.perf_counter()
            t_metrics = cached(Path(t_job.out), lambda job=t_job: train_teacher(job, threads=THREADS))
            if ledger is not None:
                record_teacher(ledger, Path(t_job.out))
            teacher = {**{k: t_metrics.get(k) for k in ("ca", "asr")}, "sha256": teacher_sha256(Path(t_job.out))}
            rows = [(f"teacher ({ATTACK_LABEL[attack]})", cfg["teacher"], t_metrics)]
            for method in methods:
                s_out = cell_dir(out, attack, method, seed)
                # cells outside --only are reported when an earlier call finished them, never run
                m = student_stage(method, t_job.out, cfg, out, attack, methods, seed, args.progress) \
                    if method in todo else finished(s_out)
                if m is None:
                    add_from_ledger(summary, ledger, attack, method, seed)
                    continue
                rows.append((f"student: {method}", cfg["student"], m))
                student = {k: m.get(k) for k in ("ca", "asr", "asr_no_trigger", "ra", "seconds")}
                log = run_log(s_out)
                student["train_seconds"] = train_seconds(log, m)
                student["peak_asr"] = peak_asr(log)
                cell = {"attack": attack, "method": method, "seed": seed, "teacher": teacher, "student": student,
                        "abd_reference": ABD_REFERENCE.get(attack, {}).get(method)}
                if ledger is not None:
                    record_cell(ledger, cell, torch.get_num_threads())
                summary["cells"].append({**cell, "source": "run"})
            print(f"\n## {ATTACK_LABEL[attack]}, seed {seed} ({time.perf_counter() - t0:.0f} s this call)\n")
            print(metrics_table(rows))
    out.mkdir(parents=True, exist_ok=True)  # --report before any run
    summary["targets"] = target_check(summary["cells"])
    (out / f"summary_{args.table}.json").write_text(json.dumps(summary, indent=2))
    # ASR without the trigger: the student's target bias (runs older than the metric show —).
    # Minutes: training time summed over every call of a resumed run (evaluations excluded).
    # Peak ASR: the highest logged test ASR of a data-free run, a diagnostic; the ASR column is the last.
    # Source: "run" (this machine's run directory) or "ledger" (a committed record; "ledger*":
    # transcribed from the docs after its runs were lost, see the record's "provenance").
    print("\n| attack | method | seed | student CA % | student ASR % | ASR without trigger % | "
          "peak ASR % (round) | ABD (WRN) CA / ASR % | train minutes | source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in summary["cells"]:
        ref = c["abd_reference"]
        s = c["student"]
        asr = "—" if s["asr"] is None else f"{100 * s['asr']:.1f}"
        bias = "—" if s.get("asr_no_trigger") is None else f"{100 * s['asr_no_trigger']:.1f}"
        peak = "—" if not s.get("peak_asr") else f"{100 * s['peak_asr'][0]:.1f} ({s['peak_asr'][1]})"
        print(f"| {ATTACK_LABEL[c['attack']]} | {c['method']} | {c['seed']} | {100 * s['ca']:.1f} | {asr} | "
              f"{bias} | {peak} | {'—' if ref is None else f'{ref[0]} / {ref[1]}'} | "
              f"{s['train_seconds'] / 60:.1f} | {c['source']}{'*' if c.get('provenance') else ''} |")
    print_means(summary["cells"])
    if summary["cells"]:
        print("\n" + headline_table(summary["cells"], HEADLINE_METHODS if args.table == "abd" else None))
    print_targets(summary["targets"])
    if summary["missing"]:
        print(f"\nnot run yet: {' '.join(summary['missing'])}")


def student_means(students: list[dict]) -> tuple[float, float | None, float]:
    """Mean CA, mean ASR (None when no student has one) and mean train minutes of ``students``
    (the ``student`` entries of cells; fractions and seconds in, minutes out)."""
    asrs = [s["asr"] for s in students if s["asr"] is not None]
    return (sum(s["ca"] for s in students) / len(students), sum(asrs) / len(asrs) if asrs else None,
            sum(s["train_seconds"] for s in students) / len(students) / 60)


def print_means(cells: list[dict]) -> None:
    """Mean CA, ASR and minutes per method over the attacks it ran on (the ABD table's last rows)."""
    by_method: dict[str, list[dict]] = {}
    for c in cells:
        by_method.setdefault(c["method"], []).append(c["student"])
    print("\n| method | cells | mean CA % | mean ASR % | mean train minutes |")
    print("|---|---|---|---|---|")
    for method, rows in by_method.items():
        ca, asr, minutes = student_means(rows)
        mean_asr = "—" if asr is None else f"{100 * asr:.1f}"
        print(f"| {method} | {len(rows)} | {100 * ca:.1f} | {mean_asr} | {minutes:.1f} |")


#: the headline's columns for ``--table abd``: the issue's cells, the SV-only / SR-only ablation
#: between undefended ZSKT and full ABD
HEADLINE_METHODS = ["zskt", "zskt+sv", "zskt+sr", "zskt+abd", "clean_kd", "cmi", "cmi+abd"]


def headline_table(cells: list[dict], methods: list[str] | None = None) -> str:
    """The table at a glance, as Markdown: a row per (attack, seed), a column per method holding
    "CA / ASR" in % (last round or epoch), then a row of means over the rows each method ran on
    (with their count) and a row of mean train minutes.

    ``methods`` fixes the columns (None: every method of ``cells``, in order of appearance);
    methods no cell ran are left out, and cells of other methods are not shown. A cell distilled
    from another teacher than the row's first shown cell (``teacher["sha256"]`` differs, e.g. a
    teacher trained again after the first was lost) is marked †; the means still count it.
    """
    present = list(dict.fromkeys(c["method"] for c in cells))
    columns = [m for m in (present if methods is None else methods) if m in present]
    rows: dict[tuple[str, int], dict[str, dict]] = {}
    for c in cells:
        if c["method"] in columns:
            rows.setdefault((c["attack"], c["seed"]), {})[c["method"]] = c

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}"

    lines = ["| attack | seed | " + " | ".join(f"{m} CA / ASR %" for m in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for (attack, seed), by_method in rows.items():
        digest = teacher_digest(next(by_method[m] for m in columns if m in by_method))
        texts = []
        for m in columns:
            c = by_method.get(m)
            if c is None:
                texts.append("—")
                continue
            other = teacher_digest(c) != digest
            texts.append(f"{pct(c['student']['ca'])} / {pct(c['student']['asr'])}{' †' if other else ''}")
        lines.append(f"| {ATTACK_LABEL.get(attack, attack)} | {seed} | " + " | ".join(texts) + " |")
    means, minutes = [], []
    for m in columns:
        students = [by_method[m]["student"] for by_method in rows.values() if m in by_method]
        ca, asr, mean_minutes = student_means(students)
        means.append(f"{pct(ca)} / {pct(asr)} ({len(students)})")
        minutes.append(f"{mean_minutes:.1f}")
    lines.append("| mean (cells) | | " + " | ".join(means) + " |")
    lines.append("| mean train minutes | | " + " | ".join(minutes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
