"""Cost of one data-free round (ZSKT, CMI): images/s through teacher and student, GFLOP/s vs peak.

For each method and each variant (precision/memory format, teacher-output reuse), the script
builds the method exactly as ``kdguard distill-datafree`` does (random-weight teacher and student:
the cost does not depend on the weights), runs ``--warmup`` rounds, then times ``--rounds``
rounds and reports

* seconds per round, split into synthesis (``synthesize()``) and student steps;
* images per second through the teacher and through the student (forward passes counted by
  hooks, whatever the pass is for: generator step, student step, contrastive view);
* the floating-point work of one round (``torch.utils.flop_counter``: convolutions and matmuls,
  forward and backward) and the achieved GFLOP/s against the machine's measured matmul peak
  (a 2048² ``torch.mm`` in fp32 and bf16).

Results go to ``<out>/datafree_cost.json`` and are printed as a Markdown table.

    python benchmarks/datafree_cost.py                 # CIFAR-10 sizes, ResNet-20 → ResNet-8
    python benchmarks/datafree_cost.py --tiny          # seconds-long check that it runs
    python benchmarks/datafree_cost.py --methods zskt --variants "bf16 + channels_last" --abd off sv sr
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdguard.abd import ShufflingVaccine, build_abd
from kdguard.checkpoint import load_model
from kdguard.datafree import DataFreeLoop, MethodContext, build_method, preset_values
from kdguard.jobs import DataFreeABDJob
from kdguard.models import build_model
from kdguard.runtime import autocast, configure_threads, machine_label, resolve_device

# name → (bf16, channels_last, reuse teacher outputs across the student steps of a round)
VARIANTS = {
    "fp32, reference (teacher re-run per student step)": (False, False, False),
    "fp32": (False, False, True),
    "bf16 + channels_last": (True, True, True),
}
# ABD plug-in variants (``--abd``): abd.mode and extra settings. "sr" times rounds *inside* the
# SR phase (phase = the whole run), i.e. the cost of one of the last rounds.
ABD_VARIANTS = {  # name → (abd.mode, {"sv" | "sr": {setting: value}})
    "off": ("off", {}),
    "sv": ("sv", {}),
    "sv, no grad through T̃": ("sv", {"sv": {"shuffle_grad": False}}),
    # before the flagged-rows pass: T̃ with gradient on the whole batch at every generator step
    "sv, whole-batch pass": ("sv", {"sv": {}}),
    "sr": ("sr", {"sr": {"phase": 1.0}}),
    "sr, bf16 passes": ("sr", {"sr": {"phase": 1.0, "amp": True}}),
    # before the NCHW forward: SR's double backward in the student's own (channels_last) layout
    "sr, student's layout": ("sr", {"sr": {"phase": 1.0, "nchw": False}}),
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n×n by n×n matmul (best of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def make_job(method: str, args: argparse.Namespace) -> DataFreeABDJob:
    job = DataFreeABDJob(teacher="unused", method=method, preset="none", student=args.student)
    for section, values in preset_values(method, args.preset).items():
        if isinstance(values, dict):
            for key, value in values.items():
                setattr(getattr(job, section), key, value)
    if args.tiny:
        job.schedule.batch_size = 16
        job.schedule.synthesis_batch_size = None if method == "zskt" else 16
        job.schedule.generator_steps = 1 if method == "zskt" else 3
        job.schedule.student_steps = 3
        job.cmi.bank_size, job.cmi.negatives = 256, 64
    if args.batch:
        job.schedule.batch_size = args.batch
        if method != "zskt":
            job.schedule.synthesis_batch_size = args.batch
    if args.generator_steps:
        job.schedule.generator_steps = args.generator_steps
    if args.student_steps:
        job.schedule.student_steps = args.student_steps
    return job


class Counter:
    """Counts images through a model's forward (a host-side integer: no device sync)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.images += int(args[0].shape[0])


def measure(method: str, variant: str, args: argparse.Namespace, device: torch.device,
            abd_variant: str = "off") -> dict:
    bf16, channels_last, reuse = VARIANTS[variant]
    shape = tuple(args.shape)
    torch.manual_seed(0)
    if args.teacher_dir:  # a trained teacher: SV's flagged share (and so its cost) is realistic
        teacher = load_model(args.teacher_dir)[0].to(device).eval()
    else:
        teacher = build_model(args.teacher, num_classes=10, in_channels=shape[0]).to(device).eval()
    student = build_model(args.student, num_classes=10, in_channels=shape[0]).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    job = make_job(method, args)
    ctx = MethodContext(teacher=teacher, student=student, image_shape=shape, num_classes=10,
                        mean=(0.5,) * shape[0], std=(0.25,) * shape[0], hflip=True, device=device,
                        bf16=bf16, seed=0)
    parts = build_method(job, ctx)
    mode, extra = ABD_VARIANTS[abd_variant]
    job.abd.mode = mode
    for part, settings in extra.items():
        for key, value in settings.items():
            setattr(getattr(job.abd, part), key, value)
    abd = build_abd(job.abd, teacher=teacher, image_shape=shape, device=device, method=method,
                    autocast=lambda: autocast(device, bf16))
    vaccine = getattr(abd, "vaccine", None) if abd is not None else None
    if vaccine is not None:
        vaccine.SUBSET_MAX_SHARE = -1.0 if abd_variant == "sv, whole-batch pass" else ShufflingVaccine.SUBSET_MAX_SHARE
    synth = parts.synthesizer
    if not reuse:
        synth.reuses_batch = False
    synth_time = [0.0]
    original = synth.synthesize

    def timed_synthesize():
        t0 = time.perf_counter()
        out = original()
        if device.type == "cuda":
            torch.cuda.synchronize()
        synth_time[0] += time.perf_counter() - t0
        return out

    synth.synthesize = timed_synthesize
    total = args.warmup + args.rounds + 1
    loop = DataFreeLoop(synth, student, teacher, parts.objective, rounds=total,
                        student_steps=parts.student_steps, batch_size=job.schedule.batch_size,
                        optim=job.student_optim, device=device, bf16=bf16, progress=False,
                        extensions=abd.extensions if abd is not None else None)
    loop.monitor.every = loop.monitor.grid_every = loop.monitor.checkpoint_every = 0
    loop.run(resume=False, stop_after=args.warmup)
    t_count, s_count = Counter(teacher), Counter(student)
    synth_time[0] = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loop.run(resume=False, stop_after=args.warmup + args.rounds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.rounds
    synthesis_seconds = synth_time[0] / args.rounds
    with FlopCounterMode(display=False) as flops:
        loop.run(resume=False, stop_after=args.warmup + args.rounds + 1)
    gflop = flops.get_total_flops() / 1e9
    loop.close()
    return {
        "method": method, "variant": variant, "abd": abd_variant, "batch": job.schedule.batch_size,
        "synthesis_batch": job.schedule.synthesis_batch_size or job.schedule.batch_size,
        "generator_steps": job.schedule.generator_steps, "student_steps": parts.student_steps,
        "seconds_per_round": seconds, "synthesis_seconds": synthesis_seconds,
        "student_seconds": seconds - synthesis_seconds,
        "teacher_images_per_s": t_count.images / args.rounds / seconds,
        "student_images_per_s": s_count.images / args.rounds / seconds,
        "gflop_per_round": gflop, "gflops": gflop / seconds,
        "sv_flagged_share": None if vaccine is None else vaccine.flagged_share,  # warm-up included
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median s/round, plus every repeat's s/round (``seconds_samples``)."""
    ordered = sorted(runs, key=lambda r: r["seconds_per_round"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": len(runs),
            "seconds_samples": [r["seconds_per_round"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["zskt", "cmi"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--teacher", default="resnet20")
    ap.add_argument("--teacher-dir", default=None,
                    help="a trained teacher's run directory (default: a random-init --teacher)")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    ap.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    ap.add_argument("--batch", type=int, default=None, help="student (and synthesis) batch")
    ap.add_argument("--generator-steps", type=int, default=None)
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every variant this many times, in alternating order, and report "
                         "the median s/round with its range (wall-time differences of a few per "
                         "cent need it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--abd", nargs="+", default=["off"], choices=list(ABD_VARIANTS),
                    help="ABD plug-in variants to time next to each other (e.g. off sv sr)")
    ap.add_argument("--tiny", action="store_true", help="small sizes: checks that the script runs")
    ap.add_argument("--out", default="runs/bench_datafree_cost")
    args = ap.parse_args()
    if args.tiny:
        args.teacher, args.student, args.shape = "resnet8", "resnet8", [3, 16, 16]
        args.rounds, args.warmup = 1, 1
    configure_threads(args.threads)
    device = resolve_device(args.device)
    # bf16 only when a variant uses it: without bf16 hardware (e.g. Zen 3) the 2048² matmul is
    # emulated and takes minutes
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if any(v.startswith("bf16") for v in args.variants):
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    # the reference variant only differs where a round's batch is reused (ZSKT-style)
    cells = [(m, v, a) for m in args.methods for v in args.variants
             if VARIANTS[v][2] or m == "zskt" for a in args.abd]
    samples: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    for repeat in range(args.repeats):
        # forwards, then backwards (ABBA…): a slow drift of the machine's speed hits every variant alike
        for cell in cells if repeat % 2 == 0 else cells[::-1]:
            samples[cell].append(measure(cell[0], cell[1], args, device, cell[2]))
    rows = [median_run(samples[cell]) for cell in cells]
    result = {"machine": machine_label(device), "device": str(device),
              "threads": torch.get_num_threads(), "teacher": args.teacher, "student": args.student,
              "shape": args.shape, "preset": args.preset, "matmul_peak_gflops": peaks, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "datafree_cost.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.teacher} → {args.student}, input {tuple(args.shape)}, {device}, "
          f"{torch.get_num_threads()} threads; matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + "\n")
    print("| method | variant | ABD | batch | g-steps | s-steps | s/round (median, range) | synthesis s | student s | "
          "teacher img/s | student img/s | GFLOP/round | GFLOP/s | % of peak | SV flagged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = peaks["bf16" if r["variant"].startswith("bf16") else "fp32"]
        flagged = "" if r["sv_flagged_share"] is None else f"{100 * r['sv_flagged_share']:.0f} %"
        seconds = f"{r['seconds_per_round']:.3f}"
        if r["repeats"] > 1:
            seconds += f" ({min(r['seconds_samples']):.3f}–{max(r['seconds_samples']):.3f})"
        print(f"| {r['method']} | {r['variant']} | {r['abd']} | {r['batch']} | {r['generator_steps']} | "
              f"{r['student_steps']} | {seconds} | {r['synthesis_seconds']:.3f} | "
              f"{r['student_seconds']:.3f} | {r['teacher_images_per_s']:.0f} | "
              f"{r['student_images_per_s']:.0f} | {r['gflop_per_round']:.2f} | {r['gflops']:.1f} | "
              f"{100 * r['gflops'] / peak:.0f} | {flagged} |")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
