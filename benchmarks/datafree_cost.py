"""Cost of one data-free round (ZSKT, CMI), side by side: s/round, images/s, GFLOP/s vs peak.

Per method x variant (precision/memory format, teacher-output reuse) x ABD plug-in variant, fresh
models (random weights unless --teacher-dir), measured by ``kdguard.jobs.datafree_cost.round_cost``.
"sr" variants time rounds inside the SR phase (phase = the whole run). Results: <out>/datafree_cost.json.

    python benchmarks/datafree_cost.py                 # CIFAR-10 sizes, ResNet-20 -> ResNet-8
    python benchmarks/datafree_cost.py --tiny          # seconds-long check that it runs
    python benchmarks/datafree_cost.py --methods zskt --variants "bf16 + channels_last" --abd off sv sr
"""
import argparse, json  # noqa: E401
from pathlib import Path

import torch

from kdguard.checkpoint import load_model
from kdguard.jobs import build_datafree_job
from kdguard.jobs.datafree_cost import RoundVariant, cost_table, matmul_peak, median_run, round_cost
from kdguard.models import build_model
from kdguard.runtime import configure_threads, machine_label, resolve_device

VARIANTS = {"fp32, reference (teacher re-run per student step)": RoundVariant(reuse_batch=False),
            "fp32": RoundVariant(), "bf16 + channels_last": RoundVariant(bf16=True, channels_last=True)}
ABD = {"off": [], "sv": ["abd.mode=sv"], "sv, no grad through T̃": ["abd.mode=sv", "abd.sv.shuffle_grad=false"],
       "sv, whole-batch pass": ["abd.mode=sv"], "sr": ["abd.mode=sr", "abd.sr.phase=1.0"],
       "sr, bf16 passes": ["abd.mode=sr", "abd.sr.phase=1.0", "abd.sr.amp=true"],
       "sr, student's layout": ["abd.mode=sr", "abd.sr.phase=1.0", "abd.sr.nchw=false"]}
TINY = {"zskt": ["schedule.batch_size=16", "schedule.generator_steps=1", "schedule.student_steps=3"],
        "cmi": ["schedule.batch_size=16", "schedule.synthesis_batch_size=16", "schedule.generator_steps=3",
                "schedule.student_steps=3", "cmi.bank_size=256", "cmi.negatives=64"]}

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--methods", nargs="+", default=["zskt", "cmi"])
ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
ap.add_argument("--abd", nargs="+", default=["off"], choices=list(ABD))
ap.add_argument("--teacher", default="resnet20")
ap.add_argument("--teacher-dir", help="a trained teacher's run directory (SV's flagged share is then real)")
ap.add_argument("--student", default="resnet8")
ap.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
ap.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
ap.add_argument("--batch", type=int, help="student (and synthesis) batch")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--repeats", type=int, default=1, help="alternating repeats; the median is reported")
ap.add_argument("--device", default="auto")
ap.add_argument("--threads", type=int)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--out", default="runs/bench_datafree_cost")
a = ap.parse_args()
if a.tiny:
    a.teacher, a.student, a.shape, a.rounds = "resnet8", "resnet8", [3, 16, 16], 1
configure_threads(a.threads)
device = resolve_device(a.device)
peaks = {"fp32": matmul_peak(device, torch.float32)}
if any(v.startswith("bf16") for v in a.variants):  # emulated bf16 (no AVX-512 BF16) takes minutes
    peaks["bf16"] = matmul_peak(device, torch.bfloat16)
cells = [(m, v, b) for m in a.methods for v in a.variants if VARIANTS[v].reuse_batch or m == "zskt" for b in a.abd]


def batch(m: str) -> list[str]:  # the student batch, and CMI's synthesis batch with it
    return [f"schedule.batch_size={a.batch}"] + [f"schedule.synthesis_batch_size={a.batch}"] * (m != "zskt") if a.batch else []


def measure(m: str, v: str, b: str) -> dict:
    job = build_datafree_job(None, [f"method={m}", f"preset={a.preset}", "teacher=unused", f"student={a.student}",
                                    *(TINY[m] if a.tiny else []), *ABD[b], *batch(m)])
    torch.manual_seed(0)
    c = a.shape[0]
    teacher = load_model(a.teacher_dir)[0] if a.teacher_dir else build_model(a.teacher, num_classes=10, in_channels=c)
    variant = VARIANTS[v] if b != "sv, whole-batch pass" else RoundVariant(**{**VARIANTS[v].__dict__, "sv_whole_batch": True})
    return {"method": m, "variant": v, "abd": b, **round_cost(job, teacher, build_model(a.student, num_classes=10, in_channels=c),
                                                              tuple(a.shape), device, variant, rounds=a.rounds, warmup=a.warmup)}


samples: dict = {cell: [] for cell in cells}
for r in range(a.repeats):  # ABBA...: a slow drift of the machine's speed hits every variant alike
    for cell in cells if r % 2 == 0 else cells[::-1]:
        samples[cell].append(measure(*cell))
rows = [median_run(samples[cell]) for cell in cells]
Path(a.out).mkdir(parents=True, exist_ok=True)
(Path(a.out) / "datafree_cost.json").write_text(json.dumps(
    {"machine": machine_label(device), "threads": torch.get_num_threads(), "teacher": a.teacher, "student": a.student,
     "shape": a.shape, "preset": a.preset, "matmul_peak_gflops": peaks, "rows": rows}, indent=2))
print(f"\n{a.teacher} -> {a.student}, {tuple(a.shape)}, {machine_label(device)}, {torch.get_num_threads()} threads; "
      "matmul peak " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
print(cost_table(rows, peaks))
